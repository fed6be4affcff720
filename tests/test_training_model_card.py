"""The model card of a trained model, one builder for every task: Hub metadata that `huggingface_hub` parses (its
model-index holds the task's metrics given, in %), and a text that names the encoder, the base model, the recipe, the
paper and its numbers, the task's tables and usage, and the training settings."""

import pytest
from huggingface_hub import ModelCard

from denseclip_hf import DenseClipConfig, DenseClipResNetConfig
from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.training.detection_arguments import parse_detection_training_args
from denseclip_hf.training.model_card import detection_card, model_card, segmentation_card
from denseclip_hf.training.model_loading import offline_detection_config

PER_CLASS = {"sky": 0.5, "tree": None}
RESULTS = {"eval_mean_iou": 0.51234, "eval_mean_accuracy": 0.6, "eval_overall_accuracy": 0.875, "eval_samples": 3}
RESULTS.update(eval_per_category_iou=PER_CLASS, eval_per_category_accuracy=PER_CLASS, train_steps=1)
RESULTS.update(total_train_batch_size=32)
# COCO metrics of a detector (fractions; -1: no object of that size, as pycocotools reports it).
COCO = {"mAP": 0.12345, "mAP_50": 0.5, "mAP_75": 0.25, "mAP_s": -1.0, "mAP_m": 0.3, "mAP_l": 0.45678}
BOX = {f"eval_bbox_{name}": value for name, value in COCO.items()}
MASK = {f"eval_segm_{name}": value / 2 for name, value in COCO.items()}
DETECTION_RESULTS = {"eval_samples": 5, "train_steps": 7, "total_train_batch_size": 16}


def expected_model_index(results: dict, metrics: list[tuple[str, str, str]]) -> dict[str, float]:
    """{Hub metric id: the result in %, rounded to 2 decimals}, computed from `results` (fractions)."""
    return {metric_id: round(100 * results[key], 2) for key, metric_id, _ in metrics}


def _segmentation_run(tmp_path):
    args = parse_training_args(["--output_dir", str(tmp_path / "out")])
    config = DenseClipConfig(id2label={0: "sky", 1: "tree"})
    metrics = [("eval_mean_iou", "mean_iou"), ("eval_mean_accuracy", "mean_accuracy")]
    return (
        args,
        config,
        RESULTS,
        segmentation_card(config, RESULTS, args),
        metrics + [("eval_overall_accuracy", "accuracy")],
    )


def _detection_run(tmp_path):
    args = parse_detection_training_args(["--output_dir", str(tmp_path / "out"), "--model_type", "maskrcnn"])
    config = offline_detection_config("maskrcnn", {0: "sky", 1: "tree"})
    results = {**DETECTION_RESULTS, **BOX, **MASK}
    metrics = [
        (f"eval_{iou_type}_{suffix}", f"{name}_{metric_id}")
        for iou_type, name in (("bbox", "box"), ("segm", "mask"))
        for suffix, metric_id in (("mAP", "AP"), ("mAP_50", "AP50"), ("mAP_75", "AP75"))
    ]
    return args, config, results, detection_card(config, results, args), metrics


@pytest.mark.parametrize("run", [_segmentation_run, _detection_run], ids=["segmentation", "detection"])
def test_one_builder_writes_every_tasks_card(tmp_path, run):
    """The builder writes what the tasks share the same way (sections, provenance, shared training settings, the
    optimizer) and the task's `TaskCard` the rest: its metrics in the `model-index` (in %, as given), its pipeline."""
    args, config, results, task_card, metrics = run(tmp_path)
    text = model_card(task_card, config, results, args, "someone/denseclip-test")
    card = ModelCard(text)
    values = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert values == {metric_id: round(100 * results[key], 2) for key, metric_id in metrics}
    assert card.data.pipeline_tag == task_card.pipeline_tag == "image-segmentation"
    assert {result.task_name for result in card.data.eval_results} == {task_card.task_name}
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert headings[1:] == ["## Validation results", "## How to use", "## Training", "## Citation"]
    words = " ".join(text.split())
    assert f"with `{args.script}` of `denseclip_hf`, recipe `synthetic`:" in words
    assert f"Train with `--model_name_or_path {args.clip_example}` for a real DenseCLIP." in words
    assert f"| learning rate (image encoder x) | {args.optimization.learning_rate} (x1.0) |" in text
    assert f"| steps | {results['train_steps']} |" in text and f"| seed | {args.optimization.seed} |" in text
    assert "AdamW with the authors' parameter groups: the image encoder at x1.0 the learning rate" in words
    assert "![Validation images, ground truth and predictions](validation_predictions.png)" in text


@pytest.mark.parametrize(
    ("vision_config", "flags", "title", "base_model", "dataset", "paper", "parts", "protocol"),
    [
        (
            None,
            ["--recipe", "ade20k-vit-b16", "--model_name_or_path", "openai/clip-vit-base-patch16"],
            "# DenseCLIP ViT (patch 16, width 768, layers 12)",
            "openai/clip-vit-base-patch16",
            "scene_parse_150",
            "50.6 mIoU single-scale and 51.3 multi-scale",
            {},
            "slide 640x640 windows, stride 426x426, single scale",  # the authors' ViT-B/16 test_cfg
        ),
        (
            DenseClipResNetConfig(),
            ["--recipe", "ade20k-rn50", "--model_name_or_path", "RN50.pt"],  # an OpenAI file: no Hub base model
            "# DenseCLIP ResNet (layers [3, 4, 6, 3], width 64)",
            None,
            None,
            "43.5 mIoU single-scale and 44.7 multi-scale",
            {"prompting_type": "language_only", "decoder_type": "upernet", "test_mode": "whole"},
            "whole image, single scale",
        ),
    ],
)
def test_segmentation_card_metadata_parses_and_the_text_names_model_recipe_and_paper(
    tmp_path, monkeypatch, vision_config, flags, title, base_model, dataset, paper, parts, protocol
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RN50.pt").write_bytes(b"a local checkpoint file")
    config = DenseClipConfig(vision_config=vision_config, id2label={0: "sky", 1: "tree"}, **parts)
    flags = [*flags, "--output_dir", str(tmp_path / "out")] + (["--dataset_name", dataset] if dataset else [])
    args = parse_training_args(flags)
    text = model_card(segmentation_card(config, RESULTS, args), config, RESULTS, args, "someone/denseclip-test")
    card = ModelCard(text)  # raises on invalid metadata

    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-segmentation", "apache-2.0")
    assert {"denseclip", "clip", "semantic-segmentation"} <= set(data.tags)
    assert data.base_model == base_model and data.datasets == ([dataset] if dataset else None)
    assert data.model_name == "denseclip-test" and "mean_iou" in data.metrics
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    metrics = [("eval_mean_iou", "mean_iou", "mIoU"), ("eval_mean_accuracy", "mean_accuracy", "Mean accuracy")]
    metrics.append(("eval_overall_accuracy", "accuracy", "Pixel accuracy"))
    assert values == expected_model_index(RESULTS, metrics)
    for result in data.eval_results:
        assert (result.task_type, result.dataset_split) == ("image-segmentation", "validation")
        assert result.dataset_type == (dataset or "denseclip-synthetic-scenes")
    model_index = data.to_dict()["model-index"]  # the format the Hub renders
    assert model_index[0]["results"][0]["metrics"][0] == {"type": "mean_iou", "value": 51.23, "name": "mIoU"}

    text = card.text
    assert title in text and paper in text and "arxiv.org/abs/2112.01518" in text
    assert f"`{flags[3]}`" in text and f"recipe `{flags[1]}`" in " ".join(text.split())
    assert "| mIoU | 51.23 |" in text and "| tree | n/a | n/a |" in text
    assert 'AutoModelForSemanticSegmentation.from_pretrained("someone/denseclip-test"' in text
    # What the model is and how it was validated: the config's parts and its test protocol, as validation ran it.
    prompting, decoder = parts.get("prompting_type", "post_model"), parts.get("decoder_type", "semantic_fpn")
    words = " ".join(text.split())
    assert f"prompting: `{prompting}`" in words and f"decoder: `{decoder}`" in words
    assert f"validation images under the model's test protocol: {protocol} " in words
    assert "| crop | 640 |" in text or "| crop | 512 |" in text
    assert "| schedule | poly 0.9 to 1e-06, 1500 warmup steps |" in text


@pytest.mark.parametrize(
    ("model_type", "flags", "results", "pipeline_tag", "base_model", "dataset", "paper"),
    [
        ("retinanet", [], BOX, "object-detection", None, None, None),
        (
            "maskrcnn",
            ["--recipe", "coco-maskrcnn-denseclip-rn50", "--model_name_or_path", "RN50.pt"],
            {**BOX, **MASK},
            "image-segmentation",
            None,
            "detection-datasets/coco",
            "box AP 40.2 and mask AP 37.6 on COCO val2017",
        ),
        (
            "retinanet",
            ["--recipe", "coco-retinanet-clip-rn101", "--model_name_or_path", "someone/clip-rn101"],
            BOX,
            "object-detection",
            "someone/clip-rn101",
            None,
            "box AP 40.5 on COCO val2017",
        ),
    ],
)
def test_detection_card_metadata_holds_the_coco_ap_given(
    tmp_path, monkeypatch, model_type, flags, results, pipeline_tag, base_model, dataset, paper
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RN50.pt").write_bytes(b"a local checkpoint file")
    flags = [*flags, "--output_dir", "out", "--model_type", model_type]
    args = parse_detection_training_args(flags + (["--dataset_name", dataset] if dataset else []))
    config = offline_detection_config(model_type, {0: "sky", 1: "tree"}, args.model.prompting_type)
    results = {**DETECTION_RESULTS, **results}
    card = ModelCard(model_card(detection_card(config, results, args), config, results, args, "someone/det-test"))

    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", pipeline_tag, "apache-2.0")
    assert {"denseclip", "clip", "object-detection", "mask-rcnn" if model_type == "maskrcnn" else "retinanet"} <= set(
        data.tags
    )
    assert data.base_model == base_model and data.datasets == ([dataset] if dataset else None)
    metrics = [
        (f"eval_{iou_type}_{suffix}", f"{name}_{metric_id}", f"{name} {metric_id}")
        for iou_type, name in (("bbox", "box"), ("segm", "mask"))
        if f"eval_{iou_type}_mAP" in results
        for suffix, metric_id in (("mAP", "AP"), ("mAP_50", "AP50"), ("mAP_75", "AP75"))
    ]
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    assert values == expected_model_index(results, metrics)
    assert data.metrics == sorted(values)
    names = {result.metric_type: result.metric_name for result in data.eval_results}
    assert names == {metric_id: name for _, metric_id, name in metrics}
    task_name = "Instance Segmentation" if model_type == "maskrcnn" else "Object Detection"
    for result in data.eval_results:
        assert (result.task_type, result.task_name, result.dataset_split) == (pipeline_tag, task_name, "validation")
        assert result.dataset_type == (dataset or "denseclip-synthetic-detection")

    text, words = card.text, " ".join(card.text.split())
    detector = "Mask R-CNN" if model_type == "maskrcnn" else "RetinaNet"
    assert f"# DenseCLIP ResNet (layers [1, 1, 1, 1], width 16) {detector}" in text
    assert "| box | 12.3 | 50.0 | 25.0 | - | 30.0 | 45.7 |" in text
    assert ("| mask | 6.2 | 25.0 | 12.5 | - | 15.0 | 22.8 |" in text) == (model_type == "maskrcnn")
    assert (paper is None and "the paper reports" not in words) or f"the paper reports {paper}" in words
    assert f'pipeline("{pipeline_tag}", model="someone/det-test", trust_remote_code=True)' in text
    assert f"prompting `{args.model.prompting_type}`" in words and f"recipe `{args.optimization.recipe}`" in words
    milestones = args.optimization.lr_milestones
    assert f"| schedule | x0.1 at epochs {milestones}, linear warmup of" in text
    clip = "no clipping" if not args.optimization.max_grad_norm else "L2 norm 0.1 over the trained parameters"
    assert f"| gradient clipping | {clip} |" in text
