"""Any transformers backbone as the DenseCLIP image encoder (Sec. 4.3) and the UperNet decoder (Table 5), for the
ResNet, Swin and ConvNeXt families in tiny sizes: shapes, the pyramid against the stand-alone backbone, UperNet
against transformers' `UperNetHead`, gradients, save/load, remote code and building from a backbone checkpoint."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import CLASS_NAMES, make_model, run_without_denseclip_hf, tiny_config
from transformers import (
    AutoBackbone,
    CLIPModel,
    ConvNextConfig,
    ResNetConfig,
    ResNetForImageClassification,
    SwinConfig,
)
from transformers.models.upernet.modeling_upernet import UperNetHead

from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation, DenseClipResNetConfig
from denseclip_hf.configuration_denseclip import pyramid_backbone_config

# Tiny backbones of each family and the channels of their 4 stages (written out, not read from the package).
BACKBONES = {
    "resnet": (ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]), [8, 16, 24, 32]),
    "swin": (
        SwinConfig(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2),
        [8, 16, 32, 64],
    ),
    "convnext": (ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]), [8, 16, 24, 32]),
}


def backbone_config(tokenizer, backbone: str, **overrides) -> DenseClipConfig:
    settings = dict(vision_config=BACKBONES[backbone][0].to_dict(), backbone_attention_pool_heads=4)
    return tiny_config(tokenizer, **{**settings, **overrides})


@pytest.mark.parametrize("decoder_type", ["semantic_fpn", "upernet"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_output_shapes_and_pyramid(tokenizer, backbone, decoder_type):
    config = backbone_config(tokenizer, backbone, decoder_type=decoder_type)
    assert config.image_encoder_family == "backbone" and config.score_map_level == 3
    model = make_model(config)
    height, width, classes, dim = 64, 96, len(CLASS_NAMES), config.projection_dim
    pixel_values = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, test_mode="plain")
        base = model.base_model(pixel_values)
    channels = BACKBONES[backbone][1]
    assert out.logits.shape == (2, classes, height // 4, width // 4)
    assert out.score_map.shape == (2, classes, height // 32, width // 32)
    assert base.global_embedding.shape == (2, dim) and base.dense_embedding.shape == (2, dim, 2, 3)
    stem, *pyramid = out.hidden_states  # the backbone's stem, then its last 4 stages
    assert stem.shape[:2] == (2, config.image_encoder_settings.stem_channels())
    assert [tuple(level.shape) for level in pyramid] == [
        (2, width_, height // stride, width // stride) for width_, stride in zip(channels, (4, 8, 16, 32), strict=True)
    ]
    # The pyramid is the stand-alone transformers backbone's last 4 stages, with the same weights.
    reference = AutoBackbone.from_config(pyramid_backbone_config(BACKBONES[backbone][0])).eval()
    if hasattr(reference, "hidden_states_norms"):  # as in DenseCLIP's encoder, the stem comes back without a norm
        reference.hidden_states_norms["stem"] = torch.nn.Identity()
    loading = reference.load_state_dict(model.base_model.image_encoder.backbone.state_dict(), strict=False)
    # Only what the backbone never uses is left out (SwinBackbone: SwinModel's final `layernorm`).
    assert loading.missing_keys == (["swin.layernorm.weight", "swin.layernorm.bias"] if backbone == "swin" else [])
    with torch.no_grad():
        expected = reference(pixel_values).feature_maps
    for got, want in zip(out.hidden_states, expected, strict=True):  # the stem and the pyramid
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The score map joins the last level (x' = [x, s]).
    assert model.base_model.pyramid_channels == [*channels[:3], channels[3] + classes]


def test_upernet_matches_transformers_upernet_head(tokenizer):
    """Our UperNet is transformers' `UperNetHead` (PPM + FPN fusion) with the same weights (dropout: eval)."""
    config = backbone_config(tokenizer, "swin", decoder_type="upernet", decode_head_channels=12)
    decoder = make_model(config).decoder
    in_channels = [8, 16, 32, 64 + len(CLASS_NAMES)]
    reference = UperNetHead(
        SimpleNamespace(pool_scales=[1, 2, 3, 6], hidden_size=12, num_labels=len(CLASS_NAMES)), in_channels
    ).eval()
    renames = [
        (r"pyramid_pooling\.pools\.(\d+)\.", r"psp_modules.\1.1."),
        (r"pyramid_pooling\.bottleneck\.", "bottleneck."),
        (r"^fusion\.", "fpn_bottleneck."),
        (r"\.norm\.", ".batch_norm."),
    ]
    state = {}
    for name, tensor in decoder.state_dict().items():
        for pattern, target in renames:
            name = re.sub(pattern, target, name)
        state[name] = tensor
    reference.load_state_dict(state)
    pyramid = [
        torch.randn(2, width, 64 // stride, 96 // stride)
        for width, stride in zip(in_channels, (4, 8, 16, 32), strict=True)
    ]
    with torch.no_grad():
        torch.testing.assert_close(decoder(tuple(pyramid)), reference(pyramid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_gradients_reach_exactly_the_trainable_parts(tokenizer, backbone):
    model = make_model(backbone_config(tokenizer, backbone, decoder_type="upernet")).train()
    labels = torch.randint(0, len(CLASS_NAMES), (2, 64, 64))
    model(torch.randn(2, 3, 64, 64), labels=labels).loss.backward()
    with_gradient = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {name for name, _ in model.named_parameters() if not name.startswith("denseclip.text_encoder.")}
    assert with_gradient == trainable  # none unused: DDP needs no find_unused_parameters
    assert not any(p.requires_grad for p in model.base_model.text_encoder.parameters())


def test_family_rule_and_bad_settings(tokenizer):
    """Any backbone config (transformers' `model_type` "resnet" too) is the "backbone" family; our CLIP ResNet keeps
    its own; a dict resolves by its `model_type`; bad settings and inputs name the fix."""
    assert DenseClipConfig(vision_config=DenseClipResNetConfig()).image_encoder_family == "resnet"
    config = backbone_config(tokenizer, "resnet")
    assert type(config.vision_config) is ResNetConfig and config.vision_config.model_type == "resnet"
    assert DenseClipConfig.from_dict(config.to_dict()).image_encoder_family == "backbone"
    with pytest.raises(
        ValueError, match="backbone_attention_pool_heads.*divide the backbone's last-stage channels 32"
    ):
        backbone_config(tokenizer, "resnet", backbone_attention_pool_heads=5)
    with pytest.raises(ValueError, match="drop_path_rate.*SwinConfig.drop_path_rate"):
        backbone_config(tokenizer, "swin", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="upernet_pool_scales"):
        backbone_config(tokenizer, "swin", upernet_pool_scales=[])
    model = make_model(config)
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 64, 80), test_mode="plain")


def test_save_load_and_remote_code(tokenizer, tmp_path):
    """Each family saves and loads exactly, and loads as remote code where `denseclip_hf` cannot be imported."""
    pixel_values = torch.randn(1, 3, 64, 64)
    expected = {}
    for backbone in BACKBONES:
        model = make_model(backbone_config(tokenizer, backbone, decoder_type="upernet"))
        model.save_pretrained(tmp_path / backbone)
        loaded = DenseClipForSemanticSegmentation.from_pretrained(tmp_path / backbone).eval()
        assert type(loaded.config.vision_config) is type(BACKBONES[backbone][0])
        saved, restored = model.state_dict(), loaded.state_dict()
        assert saved.keys() == restored.keys()
        assert all(torch.equal(saved[key], restored[key]) for key in saved)
        # Outputs to float rounding: the kernels of Swin's and ConvNeXt's layers may take another path for weights
        # read from the file (another memory alignment), which changes the last bits (seen: 2e-7).
        with torch.no_grad():
            expected[backbone] = model(pixel_values, test_mode="plain").logits
            torch.testing.assert_close(
                loaded(pixel_values, test_mode="plain").logits, expected[backbone], rtol=1e-5, atol=1e-6
            )
    torch.save({"x": pixel_values, "y": expected}, tmp_path / "io.pt")
    run_without_denseclip_hf(
        f"""
        import torch
        from transformers import AutoModelForSemanticSegmentation

        io = torch.load({str(tmp_path / "io.pt")!r})
        for backbone, logits in io["y"].items():
            folder = {str(tmp_path)!r} + "/" + backbone
            model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                got = model.eval()(io["x"], test_mode="plain").logits
                torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-6)
        assert "denseclip_hf" not in sys.modules
        """,
        tmp_path,
    )


def test_from_backbone_pretrained(tiny_clip_dir, tmp_path):
    """A backbone checkpoint (here an image classifier, as ImageNet ResNets are published) + the CLIP text tower."""
    torch.manual_seed(1)
    classifier = ResNetForImageClassification(BACKBONES["resnet"][0])
    classifier.save_pretrained(tmp_path / "resnet")
    model = DenseClipForSemanticSegmentation.from_backbone_pretrained(
        tmp_path / "resnet",
        tiny_clip_dir,
        dict(enumerate(CLASS_NAMES)),
        decoder_type="upernet",
        backbone_attention_pool_heads=4,
    )
    assert model.config.image_encoder_family == "backbone" and model.config.decoder_type == "upernet"
    backbone = model.base_model.image_encoder.backbone.state_dict()
    for name, tensor in classifier.resnet.state_dict().items():
        if not name.startswith("pooler"):
            torch.testing.assert_close(backbone[name], tensor, rtol=0, atol=0, msg=name)
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    text = model.base_model.text_encoder
    torch.testing.assert_close(text.text_projection.weight, clip.text_projection.weight, rtol=0, atol=0)
    for name, tensor in clip.text_model.state_dict().items():
        torch.testing.assert_close(text.text_model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    assert not any(p.requires_grad for p in text.parameters())
    assert model.config.projection_dim == clip.config.projection_dim
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64), test_mode="plain").logits.shape == (1, len(CLASS_NAMES), 16, 16)
