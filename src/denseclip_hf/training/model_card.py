"""The model card (`README.md`) of a trained model repository: Hub metadata (library, pipeline, base model, datasets,
validation results as a `model-index`), what the model is, its results next to the paper's, usage, training."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PretrainedConfig

from ..configuration_denseclip import DECODER_TYPES, PROMPTING_TYPES, DenseClipConfig
from .arguments import DataArguments, SegmentationTrainingArguments
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
# The validation metrics of the card's `model-index`: (key in all_results.json without `eval_`, Hub id, pretty name).
_CARD_METRICS = (
    ("mean_iou", "mean_iou", "mIoU"),
    ("mean_accuracy", "mean_accuracy", "Mean accuracy"),
    ("overall_accuracy", "accuracy", "Pixel accuracy"),
)


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


def _training_data_description(data: DataArguments) -> str:
    if data.dataset_name is not None:
        return f"the Hub dataset [`{data.dataset_name}`](https://huggingface.co/datasets/{data.dataset_name})"
    if data.train_dir is not None:
        return f"the local dataset folder `{Path(data.train_dir).name}`"
    return "the synthetic scenes bundled with `denseclip_hf` (`denseclip_hf.load_synthetic_dataset`)"


def _dataset_id_and_name(data: DataArguments) -> tuple[str, str]:
    """The dataset of the validation results: its Hub id where it has one, else the folder (or synthetic set) name."""
    if data.dataset_name is not None:
        return data.dataset_name, data.dataset_name
    if data.train_dir is not None:
        return Path(data.train_dir).name, f"local folder {Path(data.train_dir).name}"
    return "denseclip-synthetic-scenes", "denseclip_hf synthetic scenes"


def model_card_data(
    config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments, repo_id: str
) -> ModelCardData:
    """The Hub metadata of a trained model: library, pipeline tag, tags, base model, datasets and the validation
    metrics (in %) as `huggingface_hub.EvalResult`s, written in the YAML as the `model-index` that the Hub shows."""
    dataset_id, dataset_name = _dataset_id_and_name(args.data)
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=args.data.dataset_config_name,
            dataset_split="validation",
            metric_type=metric_id,
            metric_name=metric_name,
            metric_value=round(100 * results[f"eval_{key}"], 2),
        )
        for key, metric_id, metric_name in _CARD_METRICS
    ]
    encoder = image_encoder_description(config.vision_config).split(" ")[0].lower()
    return ModelCardData(
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license="apache-2.0",
        tags=["denseclip", "clip", "semantic-segmentation", "vision", encoder],
        base_model=hub_base_model(args.model.model_name_or_path),
        datasets=[args.data.dataset_name] if args.data.dataset_name else None,
        metrics=[metric_id for _, metric_id, _ in _CARD_METRICS],
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )


def model_card(config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments, repo_id: str) -> str:
    """The README of a trained model: Hub metadata ([`model_card_data`]), what it is, validation metrics (overall
    and per class) next to the paper's for its recipe, usage, training."""
    base_model = args.model.model_name_or_path
    optimization, augmentation = args.optimization, args.augmentation
    base = f"`{base_model}`" if base_model else "random weights (no pre-trained CLIP)"
    recipe = RECIPES[optimization.recipe]
    warning = ""
    if base_model is None:
        warning = (
            "\n> **Random CLIP weights.** This model was trained from scratch (no `--model_name_or_path`), as the "
            "offline demo of `denseclip_hf`; it has none of CLIP's pre-trained knowledge. Train with "
            "`--model_name_or_path openai/clip-vit-base-patch16` for a real DenseCLIP.\n"
        )
    per_class = "\n".join(
        f"| {name} | {_percent(iou)} | {_percent(results['eval_per_category_accuracy'][name])} |"
        for name, iou in results["eval_per_category_iou"].items()
    )
    settings = {
        "recipe": f"`{optimization.recipe}`",
        "steps": results["train_steps"],
        "global batch": results["total_train_batch_size"],
        "crop": augmentation.crop_size,
        "learning rate (image encoder x)": (
            f"{optimization.learning_rate} (x{optimization.image_encoder_lr_multiplier})"
        ),
        "weight decay": optimization.weight_decay,
        "schedule": (
            f"poly {optimization.lr_power} to {optimization.min_learning_rate}, {optimization.num_warmup_steps} "
            "warmup steps"
        ),
        "seed": optimization.seed,
    }
    settings_table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    ratio_range = "-".join(str(ratio) for ratio in augmentation.ratio_range)
    image_scale = "x".join(str(side) for side in augmentation.image_scale)
    paper = ""
    if recipe.paper_miou:
        single_scale, multi_scale = recipe.paper_miou
        both = f" and {multi_scale} multi-scale" if multi_scale is not None else ""
        paper = f" For this recipe the paper reports {single_scale} mIoU single-scale{both} on ADE20K validation."
    protocol = EvaluationProtocol.for_model(config)  # the protocol validation ran (`loop.py`)
    metadata = model_card_data(config, results, args, repo_id).to_yaml()
    return f"""---
{metadata}
---

# DenseCLIP {image_encoder_description(config.vision_config)} for semantic segmentation
{warning}
[DenseCLIP]({PAPER_URL}) (Rao et al., CVPR 2022) turns CLIP into a dense predictor: the
pixel-text score map between the image embedding and the class-name text embeddings, refined by context-aware
prompting, guides a segmentation decoder. This model's prompting: `{config.prompting_type}`,
{PROMPTING_TYPES[config.prompting_type]}. Its decoder: `{config.decoder_type}`, {DECODER_TYPES[config.decoder_type]}.
It predicts {config.num_labels} classes and was fine-tuned from {base} on {_training_data_description(args.data)} with
`examples/train_seg.py` of `denseclip_hf`, recipe `{optimization.recipe}`: {recipe.description}.

## Validation results

{results["eval_samples"]} validation images under the model's test protocol: {protocol.describe()} (the model's
`test_mode`, `test_crop_size` and `test_stride`, which `examples/evaluate_seg.py` also uses by default).{paper}

| metric | value (%) |
|---|---|
| mIoU | {_percent(results["eval_mean_iou"])} |
| mean accuracy | {_percent(results["eval_mean_accuracy"])} |
| pixel accuracy | {_percent(results["eval_overall_accuracy"])} |

<details><summary>Per-class IoU and accuracy</summary>

| class | IoU (%) | accuracy (%) |
|---|---|---|
{per_class}

</details>

![Validation images, ground truth and predictions](validation_predictions.png)

## How to use

```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

image = Image.open("street.jpg")
processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForSemanticSegmentation.from_pretrained("{repo_id}", trust_remote_code=True)
outputs = model(**processor(images=image, return_tensors="pt"))
label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]

segmenter = pipeline("image-segmentation", model="{repo_id}", trust_remote_code=True)
segments = segmenter(image)  # [{{"label": "...", "mask": <PIL image>, "score": None}}, ...]
```

After `import denseclip_hf`, `trust_remote_code` is not needed.

## Training

| setting | value |
|---|---|
{settings_table}

AdamW; the CLIP text encoder is frozen; no weight decay on
{WEIGHT_DECAY_EXEMPTIONS[optimization.weight_decay_exemptions].description}. Augmentation: random rescale
(ratio {ratio_range} of the {image_scale} scale), random crop (cat_max_ratio {augmentation.cat_max_ratio}),
horizontal flip, photometric distortion.

{CITATION}"""


def write_model_card(
    output_dir: str | Path, config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments
) -> None:
    """Writes `README.md` ([`model_card`]) into `output_dir`; the repository id is `--hub_model_id` or the folder."""
    (Path(output_dir) / "README.md").write_text(model_card(config, results, args, args.hub_repo_id))


# ---------------------------------------------------------------------------------------------------------------------
# Detection (`examples/train_det.py`)
# ---------------------------------------------------------------------------------------------------------------------

# The COCO metrics of a detection card's `model-index`: (suffix of the `{iou_type}_` keys, Hub id, pretty name).
_DETECTION_CARD_METRICS = (("mAP", "AP", "AP"), ("mAP_50", "AP50", "AP50"), ("mAP_75", "AP75", "AP75"))
_IOU_TYPE_NAMES = {"bbox": "box", "segm": "mask"}


def _detection_dataset(data) -> tuple[str, str, str]:
    """The training data in words, and the dataset id and name of the validation results."""
    if data.dataset_name is not None:
        link = f"the Hub dataset [`{data.dataset_name}`](https://huggingface.co/datasets/{data.dataset_name})"
        return link, data.dataset_name, data.dataset_name
    if data.coco_dir is not None:
        return f"the COCO folder `{Path(data.coco_dir).name}`", "coco", "COCO"
    synthetic = (
        'the synthetic detection scenes bundled with `denseclip_hf` (`load_synthetic_dataset(task="detection")`)'
    )
    return synthetic, "denseclip-synthetic-detection", "denseclip_hf synthetic detection scenes"


def detection_model_card_data(config, results: dict, args, repo_id: str) -> ModelCardData:
    """The Hub metadata of a trained detector: COCO AP, AP50, AP75 of each IoU type in the results (box, and mask for
    Mask R-CNN; in %) as `model-index` results."""
    _, dataset_id, dataset_name = _detection_dataset(args.data)
    instance = config.model_type == "denseclip_maskrcnn"
    task_type, task_name = (
        ("image-segmentation", "Instance Segmentation") if instance else ("object-detection", "Object Detection")
    )
    eval_results = [
        EvalResult(
            task_type=task_type,
            task_name=task_name,
            dataset_type=dataset_id,
            dataset_name=dataset_name,
            dataset_config=args.data.dataset_config_name,
            dataset_split=args.data.validation_split,
            metric_type=f"{_IOU_TYPE_NAMES[iou_type]}_{metric_id}",
            metric_name=f"{_IOU_TYPE_NAMES[iou_type]} {metric_name}",
            metric_value=round(100 * results[f"eval_{iou_type}_{suffix}"], 2),
        )
        for iou_type in _IOU_TYPE_NAMES
        if f"eval_{iou_type}_mAP" in results
        for suffix, metric_id, metric_name in _DETECTION_CARD_METRICS
    ]
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=task_type,
        license="apache-2.0",
        tags=["denseclip", "clip", "object-detection", "vision", "retinanet" if not instance else "mask-rcnn"],
        base_model=hub_base_model(args.model.model_name_or_path),
        datasets=[args.data.dataset_name] if args.data.dataset_name else None,
        metrics=sorted({result.metric_type for result in eval_results}),
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
    )


def detection_model_card(config, results: dict, args, repo_id: str) -> str:
    """The README of a trained detector: Hub metadata ([`detection_model_card_data`]), what it is, COCO AP next to the
    paper's for its recipe, usage, training settings."""
    optimization, augmentation, model_args = args.optimization, args.augmentation, args.model
    recipe = DETECTION_RECIPES[optimization.recipe]
    base = f"`{model_args.model_name_or_path}`" if model_args.model_name_or_path else "random weights (no CLIP)"
    detector = "Mask R-CNN" if config.model_type == "denseclip_maskrcnn" else "RetinaNet"
    kind = "DenseCLIP" if config.prompting_type != "none" else "the CLIP baseline (no text)"
    data_description, _, _ = _detection_dataset(args.data)
    warning = ""
    if model_args.model_name_or_path is None:
        warning = (
            "\n> **Random CLIP weights.** This detector was trained from scratch (no `--model_name_or_path`), as the "
            "offline demo of `denseclip_hf`; it has none of CLIP's pre-trained knowledge. Train with "
            "`--model_name_or_path RN50.pt --recipe coco-retinanet-denseclip-rn50` for the paper's model.\n"
        )
    rows = []
    for iou_type, name in _IOU_TYPE_NAMES.items():
        if f"eval_{iou_type}_mAP" in results:
            values = [results[f"eval_{iou_type}_{suffix}"] for suffix in METRIC_SUFFIXES]
            rows.append(f"| {name} | " + " | ".join("-" if v < 0 else f"{100 * v:.1f}" for v in values) + " |")
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
            else ("the trained parameters")
        )
        clip = f"L2 norm {optimization.max_grad_norm} over {covered}"
    settings = {
        "recipe": f"`{optimization.recipe}`",
        "steps": results["train_steps"],
        "global batch": results["total_train_batch_size"],
        "learning rate (image encoder x)": (
            f"{optimization.learning_rate} (x{optimization.image_encoder_lr_multiplier})"
        ),
        "weight decay": optimization.weight_decay,
        "schedule": (
            f"x{optimization.lr_decay} at epochs {optimization.lr_milestones}, linear warmup of "
            f"{optimization.num_warmup_steps} steps from {optimization.warmup_ratio}"
        ),
        "gradient clipping": clip,
        "resize (long x short)": "x".join(str(side) for side in augmentation.image_scale),
        "horizontal flip": augmentation.flip_probability,
        "seed": optimization.seed,
    }
    settings_table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    pipeline = "image-segmentation" if detector == "Mask R-CNN" else "object-detection"
    metadata = detection_model_card_data(config, results, args, repo_id).to_yaml()
    return f"""---
{metadata}
---

# DenseCLIP {image_encoder_description(config.vision_config)} {detector}
{warning}
[DenseCLIP]({PAPER_URL}) (Rao et al., CVPR 2022) {detector}, {kind}: the pixel-text score map of the image embedding
and the class-name text embeddings joins the last level of the CLIP ResNet before the FPN. It detects
{config.num_labels} classes and was fine-tuned from {base} on {data_description} with `examples/train_det.py` of
`denseclip_hf`, recipe `{optimization.recipe}`: {recipe.description}.

## Validation results

COCO AP (%, `pycocotools`) on {results["eval_samples"]} validation images, the authors' test pipeline.{paper}

{table}

![Validation images: ground truth and predictions](validation_predictions.png)

## How to use

```python
from PIL import Image
from transformers import pipeline

detector = pipeline("{pipeline}", model="{repo_id}", trust_remote_code=True)
detections = detector(Image.open("street.jpg"))
```

After `import denseclip_hf`, `trust_remote_code` is not needed.

## Training

| setting | value |
|---|---|
{settings_table}

AdamW with the authors' parameter groups: the image encoder at x{optimization.image_encoder_lr_multiplier} the
learning rate, the CLIP text encoder unchanged (learning rate 0), no weight decay on
{WEIGHT_DECAY_EXEMPTIONS[optimization.weight_decay_exemptions].description}; batches grouped by aspect ratio.

{CITATION}"""


def write_detection_model_card(output_dir: str | Path, config, results: dict, args) -> None:
    """Writes `README.md` ([`detection_model_card`]) into `output_dir`; the repository id is `--hub_model_id` or the
    folder."""
    (Path(output_dir) / "README.md").write_text(detection_model_card(config, results, args, args.hub_repo_id))


__all__ = [
    "CITATION",
    "detection_model_card",
    "detection_model_card_data",
    "write_detection_model_card",
    "hub_base_model",
    "image_encoder_description",
    "model_card",
    "model_card_data",
    "write_model_card",
]
