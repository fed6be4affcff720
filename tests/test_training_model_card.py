"""The model card of a trained model."""

from denseclip_hf import DenseClipConfig, DenseClipResNetConfig
from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.training.model_card import model_card


def test_model_card_describes_resnet_models(tmp_path):
    config = DenseClipConfig(vision_config=DenseClipResNetConfig(), id2label={0: "sky", 1: "tree"})
    args = parse_training_args(["--recipe", "ade20k-rn50", "--output_dir", str(tmp_path)])
    per_class = {"sky": 0.5, "tree": None}
    results = {"eval_mean_iou": 0.5, "eval_mean_accuracy": 0.5, "eval_overall_accuracy": 0.5, "eval_samples": 1}
    results.update(eval_per_category_iou=per_class, eval_per_category_accuracy=per_class, train_steps=1)
    card = model_card(config, {**results, "total_train_batch_size": 32}, args, "someone/denseclip-rn50")
    assert "# DenseCLIP ResNet (layers [3, 4, 6, 3], width 64)" in card and "43.5 / 44.7 mIoU" in card
