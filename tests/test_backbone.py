"""DenseClipBackbone: DenseCLIP's language-guided pyramid as a transformers backbone (AutoBackbone), run inside
transformers' UperNet and DETR, with the Eq. 8 loss from its score map."""

import pytest
import torch
from conftest import CLASS_NAMES, ENCODER_FAMILIES, tiny_config
from safetensors import safe_open
from transformers import (
    AutoBackbone,
    AutoConfig,
    DetrConfig,
    DetrForObjectDetection,
    SwinConfig,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from denseclip_hf import (
    DenseClipBackbone,
    DenseClipBackboneConfig,
    DenseClipForSemanticSegmentation,
    DenseClipModel,
    detection_score_map_loss,
)

STAGES = ["stage1", "stage2", "stage3", "stage4"]


def backbone_config(tokenizer, family: str = "vit", **backbone_settings) -> DenseClipBackboneConfig:
    settings = tiny_config(tokenizer, vision_config=ENCODER_FAMILIES[family].vision_config).to_dict()
    return DenseClipBackboneConfig.from_dict({**settings, **backbone_settings})


@pytest.mark.parametrize("out_features", [None, ["stage2", "stage4"], ["stage3"], ["stem", "stage1"]])
def test_backbone_returns_the_chosen_levels_of_the_language_guided_pyramid(tokenizer, family, out_features):
    config = backbone_config(tokenizer, family, **({"out_features": out_features} if out_features else {}))
    torch.manual_seed(0)
    backbone = AutoBackbone.from_config(config).eval()
    assert isinstance(backbone, DenseClipBackbone)
    # Independent: the same weights in a DenseClipModel, levels picked by stride.
    model = DenseClipModel(tiny_config(tokenizer, vision_config=ENCODER_FAMILIES[family].vision_config)).eval()
    model.load_state_dict(backbone.denseclip.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        output = backbone(pixel_values, output_hidden_states=True)
        expected = model(pixel_values, output_hidden_states=True)
    wanted = out_features or ["stage4"]  # transformers' default: the last stage
    assert backbone.out_features == wanted
    channels = list(ENCODER_FAMILIES[family].pyramid_channels)
    channels[ENCODER_FAMILIES[family].score_map_level] += len(config.id2label)
    stem_channels = config.image_encoder_settings.stem_channels()
    assert backbone.channels == [stem_channels if name == "stem" else channels[STAGES.index(name)] for name in wanted]
    assert len(output.feature_maps) == len(wanted)
    for name, feature_map in zip(wanted, output.feature_maps, strict=True):
        if name == "stem":  # the image encoder's own stem, before the pyramid
            torch.testing.assert_close(feature_map, expected.hidden_states[0])
            continue
        level = STAGES.index(name)
        assert feature_map.shape == (2, channels[level], 64 // 2 ** (level + 2), 64 // 2 ** (level + 2))
        torch.testing.assert_close(feature_map, expected.pyramid[level])
    torch.testing.assert_close(output.score_map, expected.score_map)
    assert len(output.hidden_states) == 5  # the stem, then the 4 levels before the score map is joined
    assert backbone(pixel_values).hidden_states is None


def test_backbone_saves_loads_and_reads_a_segmentation_checkpoint(tokenizer, tmp_path):
    torch.manual_seed(0)
    segmenter = DenseClipForSemanticSegmentation(tiny_config(tokenizer)).eval()
    segmenter.save_pretrained(tmp_path / "segmenter")
    backbone = DenseClipBackbone.from_pretrained(tmp_path / "segmenter", out_features=["stage3"]).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = segmenter.denseclip(pixel_values).pyramid[2]
        torch.testing.assert_close(backbone(pixel_values).feature_maps[0], expected)
    backbone.save_pretrained(tmp_path / "backbone")
    with safe_open(tmp_path / "backbone" / "model.safetensors", "pt") as saved:
        assert set(saved.keys()) == set(backbone.state_dict())  # DenseCLIP's own key names
    assert AutoConfig.from_pretrained(str(tmp_path / "backbone")).out_features == ["stage3"]
    # transformers 5.24's `AutoBackbone.from_pretrained` asks the Hub whether a local folder is a repository.
    reloaded = DenseClipBackbone.from_pretrained(tmp_path / "backbone").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).feature_maps[0], expected)


def trainable_parts_have_gradients(backbone: DenseClipBackbone) -> None:
    """Gradients reach the image encoder and the contexts, never the frozen text tower."""
    denseclip = backbone.denseclip
    assert all(parameter.grad is None for parameter in denseclip.text_encoder.parameters())
    for part in (denseclip.image_encoder, denseclip.prompting):
        assert any(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in part.parameters())


def test_upernet_trains_saves_and_loads_on_the_backbone(tokenizer, family, tmp_path):
    config = UperNetConfig(
        backbone_config=backbone_config(tokenizer, family, out_features=STAGES),
        hidden_size=16,
        auxiliary_channels=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    assert isinstance(model.backbone, DenseClipBackbone)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    output = model(pixel_values, labels=labels)
    assert output.logits.shape == (2, 3, 64, 64) and torch.isfinite(output.loss)
    output.loss.backward()
    trainable_parts_have_gradients(model.backbone)
    model.eval().save_pretrained(tmp_path)
    reloaded = UperNetForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.config.backbone_config, DenseClipBackboneConfig)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits)


def test_detr_trains_with_the_eq8_loss_from_the_backbone_score_map(tokenizer, tmp_path):
    config = DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone_config(tokenizer, out_features=["stage4"]),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_queries=5,
        num_labels=4,
    )
    torch.manual_seed(0)
    model = DetrForObjectDetection(config)
    backbone = model.model.backbone.model
    assert isinstance(backbone, DenseClipBackbone)
    score_maps = []
    backbone.register_forward_hook(lambda module, args, output: score_maps.append(output.score_map))
    pixel_values = torch.randn(2, 3, 64, 64)
    # DETR boxes: normalized (cx, cy, w, h); Eq. 8 boxes: (x1, y1, x2, y2) in pixels.
    detr_boxes = [torch.tensor([[0.5, 0.5, 0.5, 0.5]]), torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.7, 0.6, 0.4, 0.6]])]
    class_labels = [torch.tensor([1]), torch.tensor([0, 3])]
    output = model(
        pixel_values,
        labels=[{"class_labels": c, "boxes": b} for c, b in zip(class_labels, detr_boxes, strict=True)],
    )
    pixel_boxes = [torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], 1) * 64 for b in detr_boxes]
    eq8 = detection_score_map_loss(
        score_maps[-1], pixel_boxes, class_labels, (64, 64), config.backbone_config.temperature
    )
    assert torch.isfinite(output.loss) and eq8 > 0
    (output.loss + eq8).backward()
    trainable_parts_have_gradients(backbone)
    model.eval().save_pretrained(tmp_path)
    reloaded = DetrForObjectDetection.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values).pred_boxes, model(pixel_values).pred_boxes)


def test_upernet_runs_on_an_any_backbone_image_encoder(tokenizer):
    """Sec. 4.3 / Table 5 through transformers' UperNet: a Swin image encoder (with its new attention pool)."""
    swin = SwinConfig(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2)
    settings = tiny_config(tokenizer, vision_config=swin.to_dict(), backbone_attention_pool_heads=4).to_dict()
    config = UperNetConfig(
        backbone_config=DenseClipBackboneConfig.from_dict({**settings, "out_features": STAGES}),
        hidden_size=16,
        auxiliary_channels=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = UperNetForSemanticSegmentation(config)
    assert model.backbone.channels == [8, 16, 32, 64 + len(CLASS_NAMES)]
    output = model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 3, (2, 64, 64)))
    output.loss.backward()
    trainable_parts_have_gradients(model.backbone)
