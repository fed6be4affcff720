"""The model a training run starts from."""

import pytest
import torch
from clip_reference import CLIP

from denseclip_hf.training.model_loading import detection_input_size, load_detection_model, load_model


def test_load_model_converts_openai_resnet_files(tmp_path):
    """`--model_name_or_path RN50.pt`: an OpenAI-format CLIP ResNet file becomes a DenseCLIP ResNet model."""
    torch.manual_seed(0)
    reference = CLIP(
        24, 64, [1, 1, 1, 1], 8, 4, context_length=16, vocab_size=49408, text_width=64, text_heads=1, text_layers=1
    )
    torch.save(reference.state_dict(), tmp_path / "RN-tiny.pt")
    model = load_model(str(tmp_path / "RN-tiny.pt"), {0: "sky", 1: "tree"}, loss_reduction="mean_all_pixels")
    assert model.config.image_encoder_family == "resnet" and model.config.score_map_level == 3
    assert model.config.prompting_type == "post_model"
    assert model.config.loss_reduction == "mean_all_pixels" and model.config.id2label == {0: "sky", 1: "tree"}
    torch.testing.assert_close(
        model.base_model.image_encoder.vision_model.attention_pool.out_proj.weight,
        reference.visual.attnpool.c_proj.weight,
    )


@pytest.mark.parametrize(("image_scale", "grid"), [((256, 128), 42), ((1333, 800), 42), ((2000, 1200), 63)])
def test_load_detection_model_on_clip_keeps_the_authors_grid_unless_inputs_are_larger(tmp_path, image_scale, grid):
    """`examples/train_det.py --model_name_or_path RN50.pt`: the detector on CLIP has the authors' 42 x 42 positional
    grid (1344 pixels, what `from_clip_pretrained` makes) at the paper's scale and below, and a grid as large as the
    padded inputs above it (the crop needs the whole feature map)."""
    torch.manual_seed(0)
    reference = CLIP(
        24, 64, [1, 1, 1, 1], 8, 4, context_length=16, vocab_size=49408, text_width=64, text_heads=1, text_layers=1
    )
    torch.save(reference.state_dict(), tmp_path / "RN-tiny.pt")
    model = load_detection_model(
        str(tmp_path / "RN-tiny.pt"), "retinanet", {0: "sky", 1: "tree"}, image_size=detection_input_size(image_scale)
    )
    pool = model.denseclip.image_encoder.vision_model.attention_pool
    assert pool.position_embedding.shape[0] == 1 + grid * grid
    assert model.config.vision_config.image_size == 32 * grid


def test_load_model_builds_the_asked_prompting():
    id2label = {0: "sky", 1: "tree"}
    model = load_model(None, id2label, prompting_type="language_only")
    assert model.config.prompting_type == "language_only"
    assert {name.split(".")[0] for name, _ in model.base_model.prompting.named_parameters()} == {"context_embeddings"}


def test_load_model_refuses_a_checkpoint_of_another_prompting(tmp_path):
    load_model(None, {0: "sky", 1: "tree"}).save_pretrained(tmp_path)
    assert load_model(str(tmp_path), {0: "sky", 1: "tree"}).config.prompting_type == "post_model"
    with pytest.raises(ValueError, match=r"prompting_type='post_model' but the run asks for 'language_only'"):
        load_model(str(tmp_path), {0: "sky", 1: "tree"}, prompting_type="language_only")
