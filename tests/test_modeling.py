"""DenseClipForSemanticSegmentation: shapes, losses, gradients, CLIP loading, save/load, attention backends."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASS_NAMES, TINY_RESNET, TINY_VISION, tiny_config
from transformers import CLIPModel, CLIPTokenizer

from denseclip_hf import (
    DenseClipConfig,
    DenseClipForSemanticSegmentation,
    DenseClipResNetConfig,
    pixel_text_score_map,
    tokenize_class_names,
)
from denseclip_hf.modeling_denseclip import drop_path, pixel_cross_entropy


def comparable(config: DenseClipConfig) -> dict:
    """The config as a dict without the fields that loading legitimately fills in (path, dtype)."""
    settings = config.to_dict()
    for sub in ("text_config", "vision_config"):
        settings[sub] = {key: value for key, value in settings[sub].items() if key != "dtype"}
    return {key: value for key, value in settings.items() if key not in ("_name_or_path", "dtype")}


def make_model(config: DenseClipConfig, seed: int = 0) -> DenseClipForSemanticSegmentation:
    torch.manual_seed(seed)
    return DenseClipForSemanticSegmentation(config).eval()


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96), (96, 48), (32, 32)])
def test_output_shapes(config, height, width):
    model = make_model(config)
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width), output_hidden_states=True, test_mode="plain")
    classes, dim = len(CLASS_NAMES), config.projection_dim
    assert out.logits.shape == (2, classes, height // 4, width // 4)
    assert out.score_map.shape == (2, classes, height // 16, width // 16)
    assert out.text_embeddings.shape == (2, classes, dim)
    assert [tuple(level.shape) for level in out.hidden_states] == [
        (2, 32, height // stride, width // stride) for stride in (4, 8, 16, 32)
    ]
    assert out.loss is None


def test_rejects_bad_pixel_values(config):
    model = make_model(config)
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 60, 64), test_mode="plain")
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(torch.randn(3, 64, 64))


def test_loss_is_decode_plus_weighted_identity(config):
    model = make_model(config)
    labels = torch.randint(0, len(CLASS_NAMES), (2, 64, 64))
    labels[0, :10] = 255
    out = model(torch.randn(2, 3, 64, 64), labels=labels)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.decode_loss + 0.4 * out.identity_loss)
    expected_decode = pixel_cross_entropy(out.logits, labels, 255, "mean_non_ignored")
    expected_identity = pixel_cross_entropy(out.score_map / 0.07, labels, 255, "mean_non_ignored")
    torch.testing.assert_close(out.decode_loss, expected_decode)
    torch.testing.assert_close(out.identity_loss, expected_identity)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(torch.randn(2, 3, 64, 64), labels=labels[:, None])


@pytest.mark.parametrize("reduction", ["mean_non_ignored", "mean_all_pixels"])
def test_pixel_cross_entropy_matches_numpy(reduction):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[1, 0] = 255
    loss = pixel_cross_entropy(logits, labels, 255, reduction)

    x, y = logits.double().numpy(), labels.numpy()
    log_probs = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    per_pixel = np.zeros(y.shape)
    valid = y != 255
    for b, i, j in zip(*np.nonzero(valid), strict=True):
        per_pixel[b, i, j] = -log_probs[b, y[b, i, j], i, j]
    expected = per_pixel.sum() / (valid.sum() if reduction == "mean_non_ignored" else y.size)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_pixel_cross_entropy_upsamples_logits_to_labels():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.randint(0, 3, (1, 16, 16))
    upsampled = F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(upsampled, labels)
    torch.testing.assert_close(pixel_cross_entropy(logits, labels, 255, "mean_non_ignored"), expected)


def test_score_map_is_cosine_similarity():
    torch.manual_seed(0)
    dense, text = torch.randn(2, 8, 3, 4), torch.randn(2, 5, 8)
    scores = pixel_text_score_map(dense, text).numpy()
    d, t = dense.numpy(), text.numpy()
    for b, k, i, j in np.ndindex(*scores.shape):
        pixel, word = d[b, :, i, j], t[b, k]
        assert scores[b, k, i, j] == pytest.approx(
            pixel @ word / np.linalg.norm(pixel) / np.linalg.norm(word), abs=1e-6
        )


def test_gradients_reach_trainable_parts_but_not_text_tower(config):
    model = make_model(config).train()
    out = model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, len(CLASS_NAMES), (2, 64, 64)))
    out.loss.backward()
    trainable = {
        "contexts": model.context_embeddings,
        "gamma": model.prompting.gamma,
        "context decoder": model.prompting.context_decoder.layers[0].cross_attn.q_proj.weight,
        "vision tower": model.image_encoder.vision_model.encoder.layers[0].mlp.fc1.weight,
        "visual projection": model.image_encoder.visual_projection.weight,
        "pyramid": model.image_encoder.pyramid.levels[0][1].weight,
        "neck": model.neck.lateral_convs[2].weight,
        "head": model.decode_head.classifier.weight,
    }
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for name, parameter in model.text_encoder.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name


def test_tuple_output_matches_dict(config):
    model = make_model(config)
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64))
    with torch.no_grad():
        as_dict = model(pixel_values, labels=labels)
        as_tuple = model(pixel_values, labels=labels, return_dict=False)
    expected = [as_dict[key] for key in as_dict.keys()]
    assert len(as_tuple) == len(expected) == 6
    for got, want in zip(as_tuple, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_batched_equals_one_by_one(config):
    model = make_model(config)
    pixel_values = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        batched = model(pixel_values, test_mode="plain")
        single = [model(pixel_values[i : i + 1], test_mode="plain") for i in range(3)]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.score_map, torch.cat([s.score_map for s in single]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("vision_config", [TINY_VISION, {"model_type": "denseclip_resnet_vision", **TINY_RESNET}])
def test_save_and_load_round_trip(tokenizer, tmp_path, vision_config):
    model = make_model(tiny_config(tokenizer, vision_config=vision_config))
    model.save_pretrained(tmp_path)
    loaded = DenseClipForSemanticSegmentation.from_pretrained(tmp_path)
    assert comparable(loaded.config) == comparable(model.config)
    assert type(loaded.config.vision_config) is type(model.config.vision_config)
    assert not any(p.requires_grad for p in loaded.text_encoder.parameters())
    torch.testing.assert_close(loaded.class_token_ids, model.class_token_ids)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


def test_text_encoder_reproduces_clip_prompt(tiny_clip_dir, tokenizer):
    """Contexts set to the embeddings of "a photo of a" make "[SOT] ctx cat [EOT]" CLIP's "a photo of a cat"."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "cat", 1: "dog"}, num_context_tokens=4
    ).eval()
    prompt_ids = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.context_embeddings.copy_(clip.text_model.embeddings.token_embedding.weight[prompt_ids])
        ours = model.get_text_embeddings()
        sentences = tokenizer(["a photo of a cat", "a photo of a dog"], return_tensors="pt")
        reference = clip.get_text_features(**sentences).pooler_output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_global_embedding_is_clip_image_embedding(tiny_clip_dir, size):
    """z_bar equals CLIP's image embedding (bicubic position interpolation matches `interpolate_pos_encoding`)."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "cat"}, position_embedding_interpolation="bicubic"
    ).eval()
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.image_encoder(pixel_values).global_embedding
        reference = clip.get_image_features(pixel_values, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_from_clip_pretrained_loads_clip_exactly_and_initialises_the_rest(tiny_clip_dir, tokenizer):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "wall", 1: "traffic light"}, fpn_channels=8, decode_head_channels=8
    )
    state = model.state_dict()
    prefixes = {
        "text_model.": "text_encoder.text_model.",
        "text_projection.": "text_encoder.text_projection.",
        "vision_model.": "image_encoder.vision_model.",
        "visual_projection.": "image_encoder.visual_projection.",
    }
    checked = 0
    for key, tensor in clip.state_dict().items():
        if key == "logit_scale":
            continue
        prefix = next(p for p in prefixes if key.startswith(p))
        torch.testing.assert_close(state[prefixes[prefix] + key[len(prefix) :]], tensor, rtol=0, atol=0, msg=key)
        checked += 1
    assert checked == len(clip.state_dict()) - 1
    assert model.config.fpn_channels == 8 and model.config.vision_config.hidden_size == 32
    assert model.config.class_token_ids == tokenize_class_names(["wall", "traffic light"], tokenizer, 5)
    torch.testing.assert_close(model.class_token_ids, torch.tensor(model.config.class_token_ids))
    # DenseCLIP's own tensors come from `_init_weights` (the model was built on the meta device).
    torch.testing.assert_close(model.prompting.gamma, torch.full((24,), 1e-4))
    assert 0.5 < model.context_embeddings.std() < 1.5 and model.context_embeddings.abs().max() <= 2
    norm = model.decode_head.scale_heads[1][0].norm
    assert torch.equal(norm.running_var, torch.ones(8)) and torch.equal(norm.running_mean, torch.zeros(8))
    assert torch.equal(model.neck.lateral_convs[0].bias, torch.zeros(8))
    assert model.decode_head.classifier.weight.std() < 0.05
    for key, tensor in state.items():
        assert tensor.device.type == "cpu" and (not tensor.is_floating_point() or torch.isfinite(tensor).all()), key


def test_from_clip_pretrained_then_save_uses_denseclip_keys(tiny_clip_dir, tmp_path):
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(tiny_clip_dir, id2label={0: "wall", 1: "sky"})
    model.save_pretrained(tmp_path)
    loaded, info = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_from_clip_pretrained_errors(tiny_clip_dir, tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"Class 1 \('a very long class name '\) needs 7 tokens"):
        DenseClipForSemanticSegmentation.from_clip_pretrained(
            tiny_clip_dir, id2label={0: "wall", 1: "a very long class name "}
        )
    no_tokenizer = tmp_path / "clip-without-tokenizer"
    CLIPModel.from_pretrained(tiny_clip_dir).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match="pass one with `tokenizer="):
        DenseClipForSemanticSegmentation.from_clip_pretrained(no_tokenizer, id2label={0: "wall"})
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        no_tokenizer, id2label={0: "wall"}, tokenizer=tokenizer, class_name_token_length=7
    )
    assert len(model.config.class_token_ids[0]) == 7
    with pytest.raises(ValueError, match="id2label keys must be 0..1"):
        DenseClipForSemanticSegmentation.from_clip_pretrained(tiny_clip_dir, id2label={0: "wall", 2: "sky"})


def test_model_without_class_token_ids_explains_fix(tokenizer):
    model = make_model(tiny_config(tokenizer, class_token_ids=None))
    with pytest.raises(ValueError, match="tokenize_class_names"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_reaches_towers(config, tmp_path, implementation):
    make_model(config).save_pretrained(tmp_path)
    model = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation=implementation)
    assert model.text_encoder.text_model.config._attn_implementation == implementation
    assert model.image_encoder.vision_model.config._attn_implementation == implementation
    reference = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation="eager")
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reference(pixel_values).logits, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(config):
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    gradients = []
    for checkpointing in (False, True):
        model = make_model(config)  # eval mode: dropout off and BatchNorm fixed outside the CLIP vision tower
        if checkpointing:
            model.gradient_checkpointing_enable()
        # Checkpointing only acts in training mode; drop path is then active too, and must draw the same masks when
        # the checkpointed layers are recomputed in the backward pass.
        model.image_encoder.vision_model.train()
        torch.manual_seed(0)
        model(pixel_values, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        layer = model.image_encoder.vision_model.encoder.layers[0]
        assert layer.gradient_checkpointing == checkpointing
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    "vision, level, expected_level",
    [({"patch_size": 8}, None, 1), ({"patch_size": 32}, None, 3), ({}, 1, 1), ({}, 3, 3)],
)
def test_score_map_joins_any_pyramid_level(tokenizer, vision, level, expected_level):
    """The default level is the score map's own stride; another level gets the score map resized to its size."""
    config = tiny_config(tokenizer, vision_config={**TINY_VISION, **vision}, score_map_level=level)
    assert config.score_map_level == expected_level
    model = make_model(config)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96), output_hidden_states=True, test_mode="plain")
    patch = config.vision_config.patch_size
    assert out.score_map.shape == (1, len(CLASS_NAMES), 64 // patch, 96 // patch)
    assert out.logits.shape == (1, len(CLASS_NAMES), 16, 24)
    assert model.neck.lateral_convs[expected_level].in_channels == 32 + len(CLASS_NAMES)


def test_from_clip_pretrained_reports_only_real_problems(tiny_clip_dir, tmp_path):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        DenseClipForSemanticSegmentation.from_clip_pretrained(tiny_clip_dir, id2label={0: "wall"})
    finally:
        transformers_logger.removeHandler(handler)
    warnings = [record.getMessage() for record in records if record.levelno >= logging.WARNING]
    # The new DenseCLIP tensors are not a problem worth a load report (nor any other warning).
    assert not warnings, warnings
    incomplete = tmp_path / "incomplete-clip"
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    state = {key: value for key, value in clip.state_dict().items() if key != "vision_model.post_layernorm.weight"}
    clip.save_pretrained(incomplete, state_dict=state)
    with pytest.raises(ValueError, match=r"not a complete CLIP checkpoint \(missing: \['image_encoder.vision_model"):
        DenseClipForSemanticSegmentation.from_clip_pretrained(
            incomplete, id2label={0: "wall"}, tokenizer=CLIPTokenizer.from_pretrained(tiny_clip_dir)
        )


def test_drop_path_drops_whole_samples_and_rescales_the_rest():
    torch.manual_seed(0)
    branch = torch.randn(4000, 3, 5)
    out = drop_path(branch, 0.25, training=True)
    dropped, kept = (out == 0).flatten(1).all(1), (out != 0).flatten(1).all(1)
    assert torch.all(dropped | kept)  # a sample's branch is dropped entirely or kept entirely
    torch.testing.assert_close(out[kept], branch[kept] / 0.75)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03
    assert drop_path(branch, 0.25, training=False) is branch
    assert torch.equal(drop_path(branch, 1.0, training=True), torch.zeros_like(branch))


def test_drop_path_rises_per_layer_and_only_acts_in_training(tokenizer):
    model = make_model(tiny_config(tokenizer, drop_path_rate=0.3))
    for layer, rate in zip(model.image_encoder.vision_model.encoder.layers, [0.0, 0.1, 0.2, 0.3], strict=True):
        hooks = [*layer.self_attn._forward_hooks.values(), *layer.mlp._forward_hooks.values()]
        assert [hook.args[0] for hook in hooks] == pytest.approx([rate, rate] if rate else [])
    reference = make_model(tiny_config(tokenizer, drop_path_rate=0.0))
    pixel_values = torch.randn(2, 3, 64, 64)
    encoder, plain = model.image_encoder, reference.image_encoder
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).global_embedding, plain(pixel_values).global_embedding)
        encoder.train()
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(encoder(pixel_values).global_embedding)
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2]) and not torch.allclose(runs[0], plain(pixel_values).global_embedding)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_resized_position_embeddings_give_the_per_forward_interpolation(tokenizer, family, tmp_path):
    """Resizing once to 96 pixels (the authors' start from CLIP) equals interpolating on every 96-pixel forward."""
    vision = TINY_VISION if family == "vit" else DenseClipResNetConfig(layers=[1, 1, 1, 1], width=8, image_size=64)
    model = make_model(tiny_config(tokenizer, vision_config=vision))
    resized = make_model(tiny_config(tokenizer, vision_config=vision))
    resized.resize_position_embeddings(96)
    assert resized.config.vision_config.image_size == 96
    pixel_values = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(resized(pixel_values).logits, model(pixel_values).logits, atol=1e-5, rtol=1e-5)
    resized.save_pretrained(tmp_path)
    loaded = DenseClipForSemanticSegmentation.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, resized(pixel_values).logits)
    table = dict(loaded.named_parameters())[
        "image_encoder.vision_model.embeddings.position_embedding.weight"
        if family == "vit"
        else "image_encoder.vision_model.attention_pool.position_embedding"
    ]
    assert table.shape[0] == 1 + (96 // (16 if family == "vit" else 32)) ** 2
    with pytest.raises(ValueError, match="must be a multiple of"):
        resized.resize_position_embeddings(100)
