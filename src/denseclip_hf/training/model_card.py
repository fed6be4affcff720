"""The model card (`README.md`) of a trained model repository, for every task: Hub metadata (library, pipeline, base
model, datasets, validation results as a `model-index`), what the model is, its results next to the paper's, usage,
training.

One builder ([`model_card`]) writes every card; a task supplies what its card says that another task's does not, as
a [`TaskCard`]: [`segmentation_card`] (`examples/train_seg.py`) and [`detection_card`] (`examples/train_det.py`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PretrainedConfig

from ..configuration_denseclip import DECODER_TYPES, PROMPTING_TYPES, DenseClipConfig
from ..configuration_denseclip_detection import DenseClipMaskRCNNConfig
from .arguments import DataArguments, SegmentationTrainingArguments
from .detection_arguments import DETECTION_PROMPTING_TYPES
from .detection_evaluation import METRIC_SUFFIXES
from .evaluation import EvaluationProtocol
from .optimization import WEIGHT_DECAY_EXEMPTIONS
from .recipes import DETECTION_RECIPES, RECIPES

PAPER_URL = "https://arxiv.org/abs/2112.01518"
# The end of every model card.
CITATION = """## Citation

```bibtex
@inproceedings{rao2022denseclip,
  title={DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting},
  author={Rao, Yongming and Zhao, Wenliang and Chen, Guangyi and Tang, Yansong and Zhu, Zheng and Huang, Guan and
          Zhou, Jie and Lu, Jiwen},
  booktitle={CVPR},
  year={2022}
}
```
"""
# How the card names an image encoder, by the `model_type` of its vision config: a name and the fields it shows.
_ENCODER_SUMMARIES = {
    "clip_vision_model": ("ViT", (("patch", "patch_size"), ("width", "hidden_size"), ("layers", "num_hidden_layers"))),
    "denseclip_resnet_vision": ("ResNet", (("layers", "layers"), ("width", "width"))),
}


@dataclass(frozen=True)
class CardMetric:
    """One validation metric of the card's `model-index`: its Hub id, its pretty name and its value (a fraction; the
    card gives it in %, to 2 decimals)."""

    metric_id: str
    name: str
    value: float


@dataclass(frozen=True)
class CardDataset:
    """The data of a run: the training data in words, and the dataset id, name and split of the validation results."""

    description: str
    dataset_id: str
    name: str
    split: str


@dataclass(frozen=True)
class TaskCard:
    """What a task's model card says that another task's does not; [`model_card`] writes the rest (metadata, title,
    provenance, the validation picture, the usage frame, the shared training settings and optimizer, citation).

    `usage` is Python code with `{repo_id}` where the repository id goes (other braces doubled); `settings` are the
    task's rows of the training table, between the shared learning-rate rows and the seed.
    """

    pipeline_tag: str  # the Hub pipeline, also the task type of the `model-index` results
    task_name: str  # the task name of the `model-index` results
    tags: tuple[str, ...]  # beyond "denseclip", "clip", "vision"
    title: str  # what the model is, after "DenseCLIP <image encoder>"
    introduction: str  # a paragraph on what the model is and predicts
    recipe_description: str
    dataset: CardDataset
    metrics: tuple[CardMetric, ...]
    validation: str  # the "Validation results" section: protocol, the paper's numbers, tables
    usage: str
    settings: dict[str, Any] = field(default_factory=dict)
    training_notes: str = ""  # after the shared optimizer sentence (augmentation, batching)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def image_encoder_description(vision_config: PretrainedConfig) -> str:
    """The image encoder in a few words, from its vision config's `model_type`: `ViT (patch 16, width 768, layers
    12)`, `ResNet (layers [3, 4, 6, 3], width 64)`, or the config's class name for another encoder."""
    name, fields = _ENCODER_SUMMARIES.get(vision_config.model_type, (type(vision_config).__name__, ()))
    details = ", ".join(f"{label} {getattr(vision_config, attribute)}" for label, attribute in fields)
    return f"{name} ({details})" if details else name


def hub_base_model(model_name_or_path: str | None) -> str | None:
    """The Hub id of the checkpoint a run started from (the card's `base_model`): `None` for random weights and for
    local files and folders."""
    if model_name_or_path is None or Path(model_name_or_path).exists():
        return None
    try:
        validate_repo_id(model_name_or_path)
    except HFValidationError:
        return None
    return model_name_or_path


def model_card_data(card: TaskCard, args: Any, repo_id: str) -> ModelCardData:
    """The Hub metadata of a trained model: library, the task's pipeline tag and tags, base model, datasets and the
    task's validation metrics (in %) as `huggingface_hub.EvalResult`s, written in the YAML as the `model-index` that
    the Hub shows. `args`: a task's training arguments."""
    eval_results = [
        EvalResult(
            task_type=card.pipeline_tag,
            task_name=card.task_name,
            dataset_type=card.dataset.dataset_id,
            dataset_name=card.dataset.name,
            dataset_config=args.data.dataset_config_name,
            dataset_split=card.dataset.split,
            metric_type=metric.metric_id,
            metric_name=metric.name,
            metric_value=round(100 * metric.value, 2),
        )
        for metric in card.metrics
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=card.pipeline_tag,
        license="apache-2.0",
        tags=["denseclip", "clip", "vision", *card.tags],
        base_model=hub_base_model(args.model.model_name_or_path),
        datasets=[args.data.dataset_name] if args.data.dataset_name else None,
        metrics=list(dict.fromkeys(metric.metric_id for metric in card.metrics)),
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )


def model_card(card: TaskCard, config: DenseClipConfig, results: dict, args: Any, repo_id: str) -> str:
    """The README of a trained model of any task: Hub metadata ([`model_card_data`]), what it is and where it comes
    from, validation results (the task's), the prediction picture, usage (the task's), the training settings (the
    shared ones and the task's) and the citation. `config`: the model's; `results`: the run's `all_results.json`;
    `args`: the task's training arguments."""
    model_name_or_path, optimization = args.model.model_name_or_path, args.optimization
    base = f"`{model_name_or_path}`" if model_name_or_path else "random weights (no pre-trained CLIP)"
    warning = ""
    if model_name_or_path is None:
        warning = (
            "\n> **Random CLIP weights.** This model was trained from scratch (no `--model_name_or_path`), as the "
            "offline demo of `denseclip_hf`; it has none of CLIP's pre-trained knowledge. Train with "
            f"`--model_name_or_path {args.clip_example}` for a real DenseCLIP.\n"
        )
    settings = {
        "recipe": f"`{optimization.recipe}`",
        "steps": results["train_steps"],
        "global batch": results["total_train_batch_size"],
        "learning rate (image encoder x)": (
            f"{optimization.learning_rate} (x{optimization.image_encoder_lr_multiplier})"
        ),
        "weight decay": optimization.weight_decay,
        **card.settings,
        "seed": optimization.seed,
    }
    settings_table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    exemptions = WEIGHT_DECAY_EXEMPTIONS[optimization.weight_decay_exemptions].description
    notes = f" {card.training_notes}" if card.training_notes else ""
    metadata = model_card_data(card, args, repo_id).to_yaml()
    return f"""---
{metadata}
---

# DenseCLIP {image_encoder_description(config.vision_config)} {card.title}
{warning}
{card.introduction} It was fine-tuned from {base} on {card.dataset.description} with `{args.script}` of
`denseclip_hf`, recipe `{optimization.recipe}`: {card.recipe_description}.

## Validation results

{card.validation}

![Validation images, ground truth and predictions](validation_predictions.png)

## How to use

```python
{card.usage.format(repo_id=repo_id)}
```

After `import denseclip_hf`, `trust_remote_code` is not needed.

## Training

| setting | value |
|---|---|
{settings_table}

AdamW with the authors' parameter groups: the image encoder at x{optimization.image_encoder_lr_multiplier} the
learning rate, the CLIP text encoder unchanged (frozen, or at learning rate 0), no weight decay on {exemptions}.{notes}

{CITATION}"""


def write_model_card(
    output_dir: str | Path, card: TaskCard, config: DenseClipConfig, results: dict, args: Any
) -> None:
    """Writes `README.md` ([`model_card`]) into `output_dir`; the repository id is `--hub_model_id` or the folder."""
    (Path(output_dir) / "README.md").write_text(model_card(card, config, results, args, args.hub_repo_id))


# ---------------------------------------------------------------------------------------------------------------------
# Semantic segmentation (`examples/train_seg.py`)
# ---------------------------------------------------------------------------------------------------------------------

# The validation metrics of a segmentation card's `model-index`: (key in all_results.json without `eval_`, Hub id,
# pretty name).
_SEGMENTATION_CARD_METRICS = (
    ("mean_iou", "mean_iou", "mIoU"),
    ("mean_accuracy", "mean_accuracy", "Mean accuracy"),
    ("overall_accuracy", "accuracy", "Pixel accuracy"),
)
_SEGMENTATION_USAGE = """from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

image = Image.open("street.jpg")
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True)
outputs = model(**processor(images=image, return_tensors="pt"))
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]

segmenter = pipeline("image-segmentation", model="{repo_id}", trust_remote_code=True)
segments = segmenter(image)  # [{{"label": "...", "mask": <PIL image>, "score": None}}, ...]"""


def _segmentation_dataset(data: DataArguments) -> CardDataset:
    if data.dataset_name is not None:
        link = f"the Hub dataset [`{data.dataset_name}`](https://huggingface.co/datasets/{data.dataset_name})"
        return CardDataset(link, data.dataset_name, data.dataset_name, "validation")
    if data.train_dir is not None:
        name = Path(data.train_dir).name
        return CardDataset(f"the local dataset folder `{name}`", name, f"local folder {name}", "validation")
    return CardDataset(
        "the synthetic scenes bundled with `denseclip_hf` (`denseclip_hf.load_synthetic_dataset`)",
        "denseclip-synthetic-scenes",
        "denseclip_hf synthetic scenes",
        "validation",
    )


def segmentation_card(config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments) -> TaskCard:
    """What the card of a semantic segmentation model says: mIoU, mean and pixel accuracy in the `model-index`; the
    validation protocol, the metrics next to the paper's for the recipe and per class; the segmentation usage; the
    crop, the poly schedule and the augmentation."""
    optimization, augmentation = args.optimization, args.augmentation
    recipe = RECIPES[optimization.recipe]
    per_class = "\n".join(
        f"| {name} | {_percent(iou)} | {_percent(results['eval_per_category_accuracy'][name])} |"
        for name, iou in results["eval_per_category_iou"].items()
    )
    paper = ""
    if recipe.paper_miou:
        single_scale, multi_scale = recipe.paper_miou
        both = f" and {multi_scale} multi-scale" if multi_scale is not None else ""
        paper = f" For this recipe the paper reports {single_scale} mIoU single-scale{both} on ADE20K validation."
    protocol = EvaluationProtocol.for_model(config)  # the protocol validation ran (`segmentation_task.py`)
    validation = f"""{results["eval_samples"]} validation images under the model's test protocol: {protocol.describe()}
(the model's `test_mode`, `test_crop_size` and `test_stride`, which `examples/evaluate_seg.py` also uses by
default).{paper}

| metric | value (%) |
|---|---|
| mIoU | {_percent(results["eval_mean_iou"])} |
| mean accuracy | {_percent(results["eval_mean_accuracy"])} |
| pixel accuracy | {_percent(results["eval_overall_accuracy"])} |

<details><summary>Per-class IoU and accuracy</summary>

| class | IoU (%) | accuracy (%) |
|---|---|---|
{per_class}

</details>"""
    ratio_range = "-".join(str(ratio) for ratio in augmentation.ratio_range)
    image_scale = "x".join(str(side) for side in augmentation.image_scale)
    encoder = image_encoder_description(config.vision_config).split(" ")[0].lower()
    return TaskCard(
        pipeline_tag="image-segmentation",
        task_name="Semantic Segmentation",
        tags=("semantic-segmentation", encoder),
        title="for semantic segmentation",
        introduction=f"""[DenseCLIP]({PAPER_URL}) (Rao et al., CVPR 2022) turns CLIP into a dense predictor: the
pixel-text score map between the image embedding and the class-name text embeddings, refined by context-aware
prompting, guides a segmentation decoder. This model's prompting: `{config.prompting_type}`,
{PROMPTING_TYPES[config.prompting_type]}. Its decoder: `{config.decoder_type}`, {DECODER_TYPES[config.decoder_type]}.
It predicts {config.num_labels} classes.""",
        recipe_description=recipe.description,
        dataset=_segmentation_dataset(args.data),
        metrics=tuple(
            CardMetric(metric_id, name, results[f"eval_{key}"]) for key, metric_id, name in _SEGMENTATION_CARD_METRICS
        ),
        validation=validation,
        usage=_SEGMENTATION_USAGE,
        settings={
            "crop": augmentation.crop_size,
            "schedule": (
                f"poly {optimization.lr_power} to {optimization.min_learning_rate}, {optimization.num_warmup_steps} "
                "warmup steps"
            ),
        },
        training_notes=f"""Augmentation: random rescale (ratio {ratio_range} of the {image_scale} scale), random crop
(cat_max_ratio {augmentation.cat_max_ratio}), horizontal flip, photometric distortion.""",
    )


# ---------------------------------------------------------------------------------------------------------------------
# Detection (`examples/train_det.py`)
# ---------------------------------------------------------------------------------------------------------------------

# The COCO metrics of a detection card's `model-index`: (suffix of the `{iou_type}_` keys, Hub id, pretty name).
_DETECTION_CARD_METRICS = (("mAP", "AP", "AP"), ("mAP_50", "AP50", "AP50"), ("mAP_75", "AP75", "AP75"))
_IOU_TYPE_NAMES = {"bbox": "box", "segm": "mask"}
_DETECTION_USAGE = """from PIL import Image
from transformers import pipeline

detector = pipeline("{pipeline}", model="{{repo_id}}", trust_remote_code=True)
detections = detector(Image.open("street.jpg"))"""


def _detection_dataset(data) -> CardDataset:
    if data.dataset_name is not None:
        link = f"the Hub dataset [`{data.dataset_name}`](https://huggingface.co/datasets/{data.dataset_name})"
        return CardDataset(link, data.dataset_name, data.dataset_name, data.validation_split)
    if data.coco_dir is not None:
        return CardDataset(f"the COCO folder `{Path(data.coco_dir).name}`", "coco", "COCO", data.validation_split)
    return CardDataset(
        'the synthetic detection scenes bundled with `denseclip_hf` (`load_synthetic_dataset(task="detection")`)',
        "denseclip-synthetic-detection",
        "denseclip_hf synthetic detection scenes",
        data.validation_split,
    )


def detection_card(config, results: dict, args) -> TaskCard:
    """What the card of a detector (RetinaNet, Mask R-CNN; `DetectionTrainingArguments`) says: COCO AP, AP50 and AP75
    of each IoU type in the results (box, and mask for Mask R-CNN) in the `model-index`; all six COCO APs next to the
    paper's for the recipe; the detection pipeline; the step schedule, gradient clipping, resize and flips."""
    optimization, augmentation = args.optimization, args.augmentation
    recipe = DETECTION_RECIPES[optimization.recipe]
    instance = config.model_type == DenseClipMaskRCNNConfig.model_type
    detector = "Mask R-CNN" if instance else "RetinaNet"
    pipeline_tag, task_name = (
        ("image-segmentation", "Instance Segmentation") if instance else ("object-detection", "Object Detection")
    )
    iou_types = [iou_type for iou_type in _IOU_TYPE_NAMES if f"eval_{iou_type}_mAP" in results]
    rows = []
    for iou_type in iou_types:
        values = [results[f"eval_{iou_type}_{suffix}"] for suffix in METRIC_SUFFIXES]
        rows.append(
            f"| {_IOU_TYPE_NAMES[iou_type]} | "
            + " | ".join("-" if value < 0 else f"{100 * value:.1f}" for value in values)
            + " |"
        )
    table = "\n".join(["| | AP | AP50 | AP75 | APs | APm | APl |", "|---|---|---|---|---|---|---|", *rows])
    paper = ""
    if recipe.paper_box_ap is not None:
        mask = f" and mask AP {recipe.paper_mask_ap}" if recipe.paper_mask_ap is not None else ""
        paper = f" For this recipe the paper reports box AP {recipe.paper_box_ap}{mask} on COCO val2017."
    clip = "no clipping"
    if optimization.clips_gradients:
        covered = (
            "every parameter incl. the text tower's (lr 0)"
            if optimization.clip_text_encoder_gradients
            else "the trained parameters"
        )
        clip = f"L2 norm {optimization.max_grad_norm} over {covered}"
    return TaskCard(
        pipeline_tag=pipeline_tag,
        task_name=task_name,
        tags=("object-detection", "mask-rcnn" if instance else "retinanet"),
        title=detector,
        introduction=f"""[DenseCLIP]({PAPER_URL}) (Rao et al., CVPR 2022) {detector} on the CLIP ResNet, prompting
`{config.prompting_type}`: {DETECTION_PROMPTING_TYPES[config.prompting_type]}. It detects {config.num_labels}
classes.""",
        recipe_description=recipe.description,
        dataset=_detection_dataset(args.data),
        metrics=tuple(
            CardMetric(
                f"{_IOU_TYPE_NAMES[iou_type]}_{metric_id}",
                f"{_IOU_TYPE_NAMES[iou_type]} {name}",
                results[f"eval_{iou_type}_{suffix}"],
            )
            for iou_type in iou_types
            for suffix, metric_id, name in _DETECTION_CARD_METRICS
        ),
        validation=f"""COCO AP (%, `pycocotools`) on {results["eval_samples"]} validation images, the authors' test
pipeline.{paper}

{table}""",
        usage=_DETECTION_USAGE.format(pipeline=pipeline_tag),
        settings={
            "schedule": (
                f"x{optimization.lr_decay} at epochs {optimization.lr_milestones}, linear warmup of "
                f"{optimization.num_warmup_steps} steps from {optimization.warmup_ratio}"
            ),
            "gradient clipping": clip,
            "resize (long x short)": "x".join(str(side) for side in augmentation.image_scale),
            "horizontal flip": augmentation.flip_probability,
        },
        training_notes="Batches grouped by aspect ratio.",
    )


__all__ = [
    "CITATION",
    "CardDataset",
    "CardMetric",
    "TaskCard",
    "detection_card",
    "hub_base_model",
    "image_encoder_description",
    "model_card",
    "model_card_data",
    "segmentation_card",
    "write_model_card",
]
