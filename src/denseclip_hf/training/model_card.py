"""The model card (`README.md`) of a trained model repository: Hub metadata (library, pipeline, base model, datasets,
validation results as a `model-index`), what the model is, its results next to the paper's, usage, training."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import PretrainedConfig

from ..configuration_denseclip import DECODER_TYPES, PROMPTING_TYPES, DenseClipConfig
from .arguments import DataArguments, SegmentationTrainingArguments
from .evaluation import EvaluationProtocol
from .optimization import WEIGHT_DECAY_EXEMPTIONS
from .recipes import RECIPES

PAPER_URL = "https://arxiv.org/abs/2112.01518"
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

## Citation

```bibtex
@inproceedings{{rao2022denseclip,
  title={{DenseCLIP: Language-Guided Dense Prediction with Context-Aware Prompting}},
  author={{Rao, Yongming and Zhao, Wenliang and Chen, Guangyi and Tang, Yansong and Zhu, Zheng and Huang, Guan and
          Zhou, Jie and Lu, Jiwen}},
  booktitle={{CVPR}},
  year={{2022}}
}}
```
"""


def write_model_card(
    output_dir: str | Path, config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments
) -> None:
    """Writes `README.md` ([`model_card`]) into `output_dir`; the repository id is `--hub_model_id` or the folder."""
    (Path(output_dir) / "README.md").write_text(model_card(config, results, args, args.hub_repo_id))


__all__ = ["hub_base_model", "image_encoder_description", "model_card", "model_card_data", "write_model_card"]
