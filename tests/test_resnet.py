"""What only the CLIP ResNet image encoder has: its config, the attention pool (Eq. 1), the tower against OpenAI's
ModifiedResNet, its init. Shapes, gradients, bad inputs and save/load of every family are in test_modeling.py."""

import pytest
import torch
from clip_reference import AttentionPool2d, ModifiedResNet, randomize_batch_norms
from conftest import TINY_RESNET, make_model, tiny_config
from safetensors.torch import load_file, save_file

from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation, DenseClipResNetConfig
from denseclip_hf.checkpoint_conversion import clip_resnet_rules, convert_keys
from denseclip_hf.modeling_clip_resnet import DenseClipAttentionPool, DenseClipResNetVisionModel


def resnet_config(tokenizer, recompute_stem_in_backward: bool = True, **overrides) -> DenseClipConfig:
    vision_config = DenseClipResNetConfig(**TINY_RESNET, recompute_stem_in_backward=recompute_stem_in_backward)
    return tiny_config(tokenizer, vision_config=vision_config, **overrides)


def test_config_defaults_by_family_and_round_trip(tokenizer, tmp_path):
    assert DenseClipResNetConfig().layers == [3, 4, 6, 3] and DenseClipResNetConfig().pyramid_channels == [
        256,
        512,
        1024,
        2048,
    ]
    config = resnet_config(tokenizer, palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]])
    assert config.image_encoder_family == "resnet" and config.score_map_level == 3
    assert config.vision_feature_layers is None and config.vision_config.embed_dim == 256
    config.save_pretrained(tmp_path)
    loaded = DenseClipConfig.from_pretrained(tmp_path)
    assert isinstance(loaded.vision_config, DenseClipResNetConfig)
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()
    assert (loaded.score_map_level, loaded.palette) == (3, config.palette)
    as_dict = DenseClipConfig(vision_config={"model_type": "denseclip_resnet_vision", "width": 16})
    assert isinstance(as_dict.vision_config, DenseClipResNetConfig) and as_dict.vision_config.width == 16
    assert tiny_config(tokenizer).score_map_level == 2  # ViT


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_feature_layers": [0, 1, 2, 3]}, "`vision_feature_layers`=\\[0, 1, 2, 3\\] applies to ViT"),
        # transformers' own "resnet" is a backbone config (the "backbone" family); a model that is none is rejected.
        ({"vision_config": {"model_type": "bert"}}, "`vision_config.model_type`=bert must be"),
        ({"vision_config": {**TINY_RESNET, "layers": [1, 1, 1]}}, "`layers`=\\[1, 1, 1\\] must be 4 block counts"),
        ({"vision_config": {**TINY_RESNET, "attention_pool_heads": 3}}, "`attention_pool_heads`=3 must divide"),
        ({"vision_config": {**TINY_RESNET, "image_size": 100}}, "`image_size`=100 must be a multiple of 32"),
        ({"vision_config": {**TINY_RESNET, "width": 7}}, "`width`=7 must be an even number"),
        ({"palette": [[0, 0, 0]]}, "`palette`=<1 colours> must hold one colour per label"),
        ({"palette": [[0, 0, 0]] * 3 + [[0, 0, 256]]}, "each colour must be 3 integers in \\[0, 255\\]"),
    ],
)
def test_invalid_settings_name_the_setting(tokenizer, overrides, message):
    settings = {"vision_config": {"model_type": "denseclip_resnet_vision", **TINY_RESNET}, **overrides}
    if isinstance(overrides.get("vision_config"), dict) and "model_type" not in overrides["vision_config"]:
        settings["vision_config"] = {"model_type": "denseclip_resnet_vision", **overrides["vision_config"]}
    with pytest.raises(ValueError, match=message):
        tiny_config(tokenizer, **settings)


@pytest.mark.parametrize("size", [(2, 2), (3, 2), (1, 4)])
def test_attention_pool_is_clips_with_resized_positions(size):
    """Eq. 1 against a straightforward re-implementation (F.multi_head_attention_forward, bilinear positions)."""
    torch.manual_seed(0)
    reference = AttentionPool2d(spacial_dim=2, embed_dim=64, num_heads=4, output_dim=24).eval()
    pool = DenseClipAttentionPool(embed_dim=64, num_heads=4, grid=2, projection_dim=24, interpolation="bilinear")
    with torch.no_grad():
        pool.position_embedding.copy_(reference.positional_embedding)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(pool, name).load_state_dict(getattr(reference, name).state_dict())
        pool.out_proj.load_state_dict(reference.c_proj.state_dict())
        features = torch.randn(3, 64, *size)
        global_embedding, dense_embedding = pool(features)
        expected_global, expected_dense = reference(features)
    torch.testing.assert_close(global_embedding, expected_global, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense_embedding, expected_dense, atol=1e-5, rtol=1e-5)


def test_resnet_tower_matches_a_straightforward_modified_resnet():
    """Stem, anti-aliased bottlenecks and shortcuts against OpenAI's ModifiedResNet (same weights, renamed)."""
    torch.manual_seed(0)
    reference = ModifiedResNet([2, 1, 2, 1], output_dim=24, heads=4, resolution=64, width=8).eval()
    randomize_batch_norms(reference)
    tower = DenseClipResNetVisionModel(
        DenseClipResNetConfig(layers=[2, 1, 2, 1], width=8, attention_pool_heads=4, image_size=64), 24, "bilinear"
    )
    weights = convert_keys(reference.state_dict(), clip_resnet_rules(""), "reference")
    tower.load_state_dict({key.removeprefix("vision_model."): value for key, value in weights.items()}, strict=True)
    pixel_values = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        (_, *pyramid), ours_global, ours_dense = tower.eval()(pixel_values)
        features, global_embedding, dense_embedding = reference(pixel_values)
    for mine, theirs in zip(pyramid, features, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_global, global_embedding, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_dense, dense_embedding, atol=1e-5, rtol=1e-5)


def test_from_pretrained_initialises_a_missing_encoder_sanely(tokenizer, tmp_path):
    """A checkpoint without the image encoder: `_init_weights` fills it on the meta device (CLIP's init)."""
    make_model(resnet_config(tokenizer)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    encoder = "denseclip.image_encoder."
    save_file({k: v for k, v in weights.items() if not k.startswith(encoder)}, tmp_path / "model.safetensors")
    model, info = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] and all(key.startswith(encoder) for key in info["missing_keys"])
    tower = model.base_model.image_encoder.vision_model
    for name, tensor in tower.state_dict().items():
        assert tensor.device.type == "cpu" and (not tensor.is_floating_point() or torch.isfinite(tensor).all()), name
    for norm in (m for m in tower.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert norm.num_batches_tracked.item() == 0
    block = tower.stages[0][0]
    assert torch.equal(block.expand_norm.weight, torch.zeros(32))  # residual branches start at zero
    assert torch.equal(block.reduce.norm.weight, torch.ones(8)) and torch.equal(
        block.shortcut.norm.bias, torch.zeros(32)
    )
    pool = tower.attention_pool
    std = 256**-0.5
    assert 0.7 * std < pool.position_embedding.std() < 1.3 * std and 0.7 * std < pool.q_proj.weight.std() < 1.3 * std
    assert torch.equal(pool.v_proj.bias, torch.zeros(256))
    assert 0.5 < block.spatial.conv.weight.std() / (2 / (8 * 9)) ** 0.5 < 1.5  # kaiming, fan_out
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(1, 3, 64, 64)).logits).all()


def test_every_module_gets_its_own_init(tokenizer):
    """Modules without parameters of their own (bottleneck, FPN, head) still run their `_init_weights` branch."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(resnet_config(tokenizer, fpn_channels=64, decode_head_channels=64))
    assert torch.equal(model.base_model.image_encoder.vision_model.stages[1][0].expand_norm.weight, torch.zeros(64))
    assert 0.005 < model.decoder.head.classifier.weight.std() < 0.015  # std 0.01
    lateral = model.decoder.neck.lateral_convs[0].weight  # xavier uniform
    assert 0.8 < lateral.std() / (2 / sum(lateral.shape[:2])) ** 0.5 < 1.2
    linear = model.base_model.prompting.context_decoder.layers[0].fc1.weight  # truncated normal, std 0.02
    assert 0.015 < linear.std() < 0.025 and linear.abs().max() <= 2


@pytest.mark.parametrize("recompute_stem, reentrant", [(True, None), (False, False), (False, True), (True, True)])
def test_recomputed_activations_give_the_plain_step(tokenizer, recompute_stem, reentrant):
    """The stem recomputed in the backward pass (`recompute_stem_in_backward`, the default) and transformers' gradient
    checkpointing of the bottlenecks (`reentrant`: its `use_reentrant`; `None`: off) give a plain training step's
    gradients (bit for bit, up to the summation order with re-entry) and BatchNorm running statistics (bit for bit:
    each replay leaves them as the forward left them, instead of updating them again), and the stem's activations are
    not kept for the backward pass."""
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    width = TINY_RESNET["width"]
    steps = []
    for recompute, use_reentrant in ((False, None), (recompute_stem, reentrant)):
        model = make_model(resnet_config(tokenizer, recompute_stem_in_backward=recompute)).train()
        if use_reentrant is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        kept = []

        def keep(tensor: torch.Tensor, kept: list = kept) -> torch.Tensor:
            kept.append(tuple(tensor.shape))
            return tensor

        torch.manual_seed(0)  # the decode head's dropout
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            loss = model(pixel_values, labels=labels).loss
        loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        statistics = {name: b for name, b in model.named_buffers() if "running" in name or "num_batches" in name}
        steps.append((gradients, statistics, kept))
    (plain_gradients, plain_statistics, plain_kept), (gradients, statistics, kept) = steps
    assert gradients.keys() == plain_gradients.keys() and statistics.keys() == plain_statistics.keys()
    for name in gradients:
        if reentrant:  # a nested backward pass per block: some gradients are summed in another order
            scale = plain_gradients[name].abs().max().item()
            torch.testing.assert_close(gradients[name], plain_gradients[name], rtol=0, atol=1e-5 * scale, msg=name)
        else:
            assert torch.equal(gradients[name], plain_gradients[name]), name
    assert all(torch.equal(statistics[name], plain_statistics[name]) for name in statistics)
    stem_activation = (2, width // 2, 32, 32)  # the first convolution's output, at half the input resolution
    assert stem_activation in plain_kept and (stem_activation in kept) == (not recompute_stem)
