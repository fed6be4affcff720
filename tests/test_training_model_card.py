"""The model card of a trained model: Hub metadata that `huggingface_hub` parses (model-index included), and a text
that names the encoder, the base model, the recipe, the paper and its numbers."""

import pytest
from huggingface_hub import ModelCard

from denseclip_hf import DenseClipConfig, DenseClipResNetConfig
from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.training.model_card import model_card

PER_CLASS = {"sky": 0.5, "tree": None}
RESULTS = {"eval_mean_iou": 0.51234, "eval_mean_accuracy": 0.6, "eval_overall_accuracy": 0.875, "eval_samples": 3}
RESULTS.update(eval_per_category_iou=PER_CLASS, eval_per_category_accuracy=PER_CLASS, train_steps=1)
RESULTS.update(total_train_batch_size=32)


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
def test_model_card_metadata_parses_and_the_text_names_model_recipe_and_paper(
    tmp_path, monkeypatch, vision_config, flags, title, base_model, dataset, paper, parts, protocol
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RN50.pt").write_bytes(b"a local checkpoint file")
    config = DenseClipConfig(vision_config=vision_config, id2label={0: "sky", 1: "tree"}, **parts)
    flags = [*flags, "--output_dir", str(tmp_path / "out")] + (["--dataset_name", dataset] if dataset else [])
    args = parse_training_args(flags)
    card = ModelCard(model_card(config, RESULTS, args, "someone/denseclip-test"))  # raises on invalid metadata

    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-segmentation", "apache-2.0")
    assert {"denseclip", "clip", "semantic-segmentation"} <= set(data.tags)
    assert data.base_model == base_model and data.datasets == ([dataset] if dataset else None)
    assert data.model_name == "denseclip-test" and "mean_iou" in data.metrics
    values = {result.metric_type: result.metric_value for result in data.eval_results}
    assert values == {"mean_iou": 51.23, "mean_accuracy": 60.0, "accuracy": 87.5}
    for result in data.eval_results:
        assert (result.task_type, result.dataset_split) == ("image-segmentation", "validation")
        assert result.dataset_type == (dataset or "denseclip-synthetic-scenes")
    model_index = data.to_dict()["model-index"]  # the format the Hub renders
    assert model_index[0]["results"][0]["metrics"][0] == {"type": "mean_iou", "value": 51.23, "name": "mIoU"}

    text = card.text
    assert title in text and paper in text and "arxiv.org/abs/2112.01518" in text
    assert f"`{flags[3]}`" in text and f"recipe `{flags[1]}`" in " ".join(text.split())
    assert "| mIoU | 51.23 |" in text and "| tree | n/a | n/a |" in text
    # What the model is and how it was validated: the config's parts and its test protocol, as validation ran it.
    prompting, decoder = parts.get("prompting_type", "post_model"), parts.get("decoder_type", "semantic_fpn")
    words = " ".join(text.split())
    assert f"prompting: `{prompting}`" in words and f"decoder: `{decoder}`" in words
    assert f"validation images under the model's test protocol: {protocol} " in words
