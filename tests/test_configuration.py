"""DenseClipConfig: defaults from the paper, derived values, validation errors that name the setting."""

import pytest
from conftest import tiny_config

from denseclip_hf import DenseClipConfig
from denseclip_hf.configuration_denseclip import default_vision_feature_layers


def test_defaults_are_the_papers():
    config = DenseClipConfig(id2label={0: "wall", 1: "sky"})
    assert config.model_type == "denseclip"
    assert config.vision_config.patch_size == 16 and config.vision_config.hidden_size == 768
    assert config.projection_dim == 512 and config.text_config.hidden_size == 512
    assert (config.num_context_tokens, config.class_name_token_length) == (8, 5)
    assert (config.context_decoder_layers, config.context_decoder_hidden_size, config.context_decoder_heads) == (
        3,
        256,
        4,
    )
    assert config.context_decoder_dropout == 0.1 and config.gamma_init_value == 1e-4
    assert (config.temperature, config.identity_loss_weight) == (0.07, 0.4)
    assert config.score_map_level == 2 and config.vision_feature_layers == [3, 5, 7, 11]
    assert (config.fpn_channels, config.decode_head_channels, config.semantic_loss_ignore_index) == (256, 256, 255)
    assert config.position_embedding_interpolation == "bilinear"
    assert config.label2id == {"wall": 0, "sky": 1}


@pytest.mark.parametrize(
    "layers, expected", [(12, [3, 5, 7, 11]), (4, [0, 1, 2, 3]), (8, [1, 3, 5, 7]), (24, [5, 11, 17, 23])]
)
def test_default_feature_layers(layers, expected):
    assert default_vision_feature_layers(layers) == expected
    assert DenseClipConfig(vision_config={"num_hidden_layers": layers}).vision_feature_layers == expected


def test_round_trip(tokenizer, tmp_path):
    config = tiny_config(tokenizer, temperature=0.1, loss_reduction="mean_all_pixels")
    config.save_pretrained(tmp_path)
    loaded = DenseClipConfig.from_pretrained(tmp_path)
    assert loaded.id2label == config.id2label and loaded.class_token_ids == config.class_token_ids
    assert loaded.temperature == 0.1 and loaded.loss_reduction == "mean_all_pixels"
    assert loaded.vision_config.hidden_size == 32 and loaded.text_config.hidden_size == 16


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_context_tokens": -1}, "`num_context_tokens`=-1 must be >= 0"),
        ({"class_name_token_length": 2}, "`class_name_token_length`=2 must be >= 3"),
        ({"num_context_tokens": 73}, "`num_context_tokens \\+ class_name_token_length`=78 must not exceed"),
        ({"context_decoder_layers": 0}, "`context_decoder_layers`=0 must be >= 1"),
        ({"context_decoder_hidden_size": 30}, "`context_decoder_hidden_size`=30 must be divisible"),
        ({"context_decoder_dropout": 1.0}, "`context_decoder_dropout`=1.0 must be in \\[0, 1\\)"),
        ({"temperature": 0.0}, "`temperature`=0.0 must be > 0"),
        ({"identity_loss_weight": -0.4}, "`identity_loss_weight`=-0.4 must be >= 0"),
        ({"score_map_level": 4}, "`score_map_level`=4 must be 0, 1, 2 or 3"),
        ({"fpn_channels": 0}, "`fpn_channels`=0 must be >= 1"),
        ({"position_embedding_interpolation": "nearest"}, "`position_embedding_interpolation`=nearest"),
        ({"loss_reduction": "sum"}, "`loss_reduction`=sum must be one of"),
        ({"vision_config": {"patch_size": 14}}, "`vision_config.patch_size`=14 must be a power of two"),
        ({"vision_feature_layers": [3, 5, 7]}, "`vision_feature_layers`=\\[3, 5, 7\\] must be 4 increasing"),
        ({"vision_feature_layers": [3, 5, 7, 12]}, "must be 4 increasing layer indices in \\[0, 11\\]"),
        ({"id2label": {0: "a"}, "class_token_ids": [[49406, 320, 49407, 0, 0]] * 2}, "one entry per label"),
        ({"id2label": {0: "a"}, "class_token_ids": [[49406, 320, 0, 0, 0]]}, "including the end token 49407"),
    ],
)
def test_invalid_settings_name_the_setting(overrides, message):
    with pytest.raises(ValueError, match=message):
        DenseClipConfig(**overrides)
