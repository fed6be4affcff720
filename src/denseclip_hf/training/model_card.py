"""What a training run leaves for people: a PNG grid of validation predictions and the model card (Pillow only)."""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..configuration_denseclip import DenseClipConfig
from .arguments import RECIPES

TILE_HEIGHT = 160
_GAP = 4
_HEADER_HEIGHT = 18
_LEGEND_COLUMNS = 4
_LEGEND_ROW_HEIGHT = 16


def color_palette(num_colors: int) -> np.ndarray:
    """`(num_colors, 3)` uint8 distinct colours: golden-ratio hues, alternating saturation and brightness."""
    hsv = [
        (int(255 * (index * 0.618034 % 1.0)), 255 - 70 * (index // 2 % 2), 255 - 60 * (index % 2))
        for index in range(num_colors)
    ]
    return np.asarray(Image.fromarray(np.asarray([hsv], dtype=np.uint8), mode="HSV").convert("RGB"))[0]


def overlay(image: np.ndarray, label_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blends class colours over `image` `(H, W, 3)` uint8 where `label_map` `(H, W)` holds a class id; pixels with
    other values (ignored) keep the image."""
    labelled = (label_map >= 0) & (label_map < len(palette))
    colors = palette[np.where(labelled, label_map, 0)].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
    return np.where(labelled[..., None], blended, image).astype(np.uint8)


def _tile(array: np.ndarray) -> Image.Image:
    image = Image.fromarray(array)
    width = max(1, round(image.width * TILE_HEIGHT / image.height))
    return image.resize((width, TILE_HEIGHT), Image.Resampling.NEAREST)


def save_prediction_grid(
    images: list[Image.Image],
    labels: list[np.ndarray],
    predictions: list[np.ndarray],
    id2label: dict[int, str],
    path: str | Path,
) -> None:
    """Saves a PNG with one row per image: the image, its ground truth overlay and the prediction overlay.

    `labels` and `predictions` are `(H, W)` class-id maps of each image's size; a legend names the classes shown.
    """
    palette = color_palette(len(id2label))
    rows = []
    for image, label, prediction in zip(images, labels, predictions, strict=True):
        pixels = np.asarray(image.convert("RGB"))
        rows.append(
            [_tile(pixels), _tile(overlay(pixels, label, palette)), _tile(overlay(pixels, prediction, palette))]
        )
    column_widths = [max(row[column].width for row in rows) for column in range(3)]
    shown = sorted({int(v) for array in (*labels, *predictions) for v in np.unique(array) if 0 <= v < len(id2label)})
    legend_top = _HEADER_HEIGHT + len(rows) * (TILE_HEIGHT + _GAP)
    width = sum(column_widths) + _GAP * 4
    height = legend_top + _LEGEND_ROW_HEIGHT * math.ceil(len(shown) / _LEGEND_COLUMNS) + _GAP
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((_GAP + sum(column_widths[:column]) + column * _GAP, 3), title, fill="black", font=font)
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            x = _GAP + sum(column_widths[:column]) + column * _GAP
            grid.paste(tile, (x, _HEADER_HEIGHT + row_index * (TILE_HEIGHT + _GAP)))
    legend_width = (width - _GAP) // _LEGEND_COLUMNS
    for position, label in enumerate(shown):
        x = _GAP + (position % _LEGEND_COLUMNS) * legend_width
        y = legend_top + (position // _LEGEND_COLUMNS) * _LEGEND_ROW_HEIGHT
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in palette[label]))
        draw.text((x + 14, y + 1), id2label[label], fill="black", font=font)
    grid.save(path)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _training_data_description(args) -> str:
    if args.dataset_name is not None:
        return f"the Hub dataset [`{args.dataset_name}`](https://huggingface.co/datasets/{args.dataset_name})"
    if args.train_dir is not None:
        return f"the local dataset folder `{Path(args.train_dir).name}`"
    return "the synthetic scenes bundled with `denseclip_hf` (`denseclip_hf.load_synthetic_dataset`)"


def _image_encoder_description(config: DenseClipConfig) -> str:
    vision = config.vision_config
    if config.image_encoder_family == "resnet":
        return f"ResNet (layers {vision.layers}, width {vision.width})"
    return f"ViT (patch {vision.patch_size}, width {vision.hidden_size})"


def model_card(config: DenseClipConfig, results: dict, args, repo_id: str) -> str:
    """The README of a trained model: what it is, validation metrics (overall and per class), usage, training."""
    base = args.model_name_or_path or "random weights (no pre-trained CLIP)"
    front_matter = ["---", "library_name: transformers", "pipeline_tag: image-segmentation", "license: apache-2.0"]
    front_matter += ["tags:", "- denseclip", "- clip", "- semantic-segmentation", "metrics:", "- mean_iou"]
    if args.model_name_or_path:
        front_matter.append(f"base_model: {args.model_name_or_path}")
    if args.dataset_name:
        front_matter += ["datasets:", f"- {args.dataset_name}"]
    front_matter.append("---")
    warning = ""
    if args.model_name_or_path is None:
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
        "recipe": args.recipe,
        "steps": results["train_steps"],
        "global batch": results["total_train_batch_size"],
        "crop": args.crop_size,
        "learning rate (image encoder x)": f"{args.learning_rate} (x{args.image_encoder_lr_multiplier})",
        "weight decay": args.weight_decay,
        "schedule": f"poly {args.lr_power} to {args.min_learning_rate}, {args.num_warmup_steps} warmup steps",
        "seed": args.seed,
    }
    settings_table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    paper_miou = RECIPES[args.recipe].paper_miou
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
{base} on {_training_data_description(args)} with `examples/train_seg.py` of `denseclip_hf`.

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
gamma. Augmentation: random rescale (ratio {args.ratio_range[0]}-{args.ratio_range[1]} of the
{args.image_scale[0]}x{args.image_scale[1]} scale), random crop (cat_max_ratio {args.cat_max_ratio}), horizontal flip,
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


def write_model_card(output_dir: str | Path, config: DenseClipConfig, results: dict, args) -> None:
    """Writes `README.md` ([`model_card`]) into `output_dir`; the repository id is `--hub_model_id` or the folder."""
    repo_id = args.hub_model_id or Path(output_dir).absolute().name
    (Path(output_dir) / "README.md").write_text(model_card(config, results, args, repo_id))


__all__ = ["color_palette", "model_card", "overlay", "save_prediction_grid", "write_model_card"]
