"""The model card (`README.md`) of a trained model repository: what it is, validation results, usage, training."""

from pathlib import Path

from ..configuration_denseclip import DenseClipConfig
from .arguments import DataArguments, SegmentationTrainingArguments
from .recipes import RECIPES


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _training_data_description(data: DataArguments) -> str:
    if data.dataset_name is not None:
        return f"the Hub dataset [`{data.dataset_name}`](https://huggingface.co/datasets/{data.dataset_name})"
    if data.train_dir is not None:
        return f"the local dataset folder `{Path(data.train_dir).name}`"
    return "the synthetic scenes bundled with `denseclip_hf` (`denseclip_hf.load_synthetic_dataset`)"


def _image_encoder_description(config: DenseClipConfig) -> str:
    vision = config.vision_config
    if config.image_encoder_family == "resnet":
        return f"ResNet (layers {vision.layers}, width {vision.width})"
    return f"ViT (patch {vision.patch_size}, width {vision.hidden_size})"


def model_card(config: DenseClipConfig, results: dict, args: SegmentationTrainingArguments, repo_id: str) -> str:
    """The README of a trained model: what it is, validation metrics (overall and per class), usage, training."""
    base_model, dataset_name = args.model.model_name_or_path, args.data.dataset_name
    optimization, augmentation = args.optimization, args.augmentation
    base = base_model or "random weights (no pre-trained CLIP)"
    front_matter = ["---", "library_name: transformers", "pipeline_tag: image-segmentation", "license: apache-2.0"]
    front_matter += ["tags:", "- denseclip", "- clip", "- semantic-segmentation", "metrics:", "- mean_iou"]
    if base_model:
        front_matter.append(f"base_model: {base_model}")
    if dataset_name:
        front_matter += ["datasets:", f"- {dataset_name}"]
    front_matter.append("---")
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
        "recipe": optimization.recipe,
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
    paper_miou = RECIPES[optimization.recipe].paper_miou
    paper = (
        f" The paper reports {paper_miou[0]} / {paper_miou[1]} mIoU (single / multi-scale) for this recipe."
        if paper_miou
        else ""
    )
    return f"""{chr(10).join(front_matter)}

# DenseCLIP {_image_encoder_description(config)} for semantic segmentation
{warning}
[DenseCLIP](https://arxiv.org/abs/2112.01518) (Rao et al., CVPR 2022) turns CLIP into a dense predictor: the
pixel-text score map between the image embedding and the class-name text embeddings, refined by context-aware
prompting, is fed to a Semantic FPN decoder. This model predicts {config.num_labels} classes and was fine-tuned from
{base} on {_training_data_description(args.data)} with `examples/train_seg.py` of `denseclip_hf`.

## Validation results

{results["eval_samples"]} validation images, single-scale whole-image inference (the paper evaluates with a sliding
window, which this package does not implement yet).{paper}

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

AdamW; the CLIP text encoder is frozen; no weight decay on normalization layers, biases, the learnable contexts and
gamma. Augmentation: random rescale (ratio {ratio_range} of the
{image_scale} scale), random crop (cat_max_ratio {augmentation.cat_max_ratio}), horizontal flip,
photometric distortion.

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


__all__ = ["model_card", "write_model_card"]
