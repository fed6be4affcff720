"""The model a training run starts from."""

import torch
from clip_reference import CLIP

from denseclip_hf.training.model_loading import load_model


def test_load_model_converts_openai_resnet_files(tmp_path):
    """`--model_name_or_path RN50.pt`: an OpenAI-format CLIP ResNet file becomes a DenseCLIP ResNet model."""
    torch.manual_seed(0)
    reference = CLIP(
        24, 64, [1, 1, 1, 1], 8, 4, context_length=16, vocab_size=49408, text_width=64, text_heads=1, text_layers=1
    )
    torch.save(reference.state_dict(), tmp_path / "RN-tiny.pt")
    model = load_model(str(tmp_path / "RN-tiny.pt"), {0: "sky", 1: "tree"}, loss_reduction="mean_all_pixels")
    assert model.config.image_encoder_family == "resnet" and model.config.score_map_level == 3
    assert model.config.loss_reduction == "mean_all_pixels" and model.config.id2label == {0: "sky", 1: "tree"}
    torch.testing.assert_close(
        model.base_model.image_encoder.vision_model.attention_pool.out_proj.weight,
        reference.visual.attnpool.c_proj.weight,
    )
