"""DenseClipModel and DenseClipForSemanticSegmentation: shapes, losses, gradients, save/load and cross-loading, for
every image encoder family; CLIP loading, attention backends and the ViT-only parts."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASS_NAMES, ENCODER_FAMILIES, TINY_VISION, make_model, tiny_config
from transformers import CLIPModel, CLIPTokenizer

from denseclip_hf import (
    DenseClipConfig,
    DenseClipForSemanticSegmentation,
    DenseClipModel,
    pixel_text_score_map,
    tokenize_class_names,
)
from denseclip_hf.configuration_denseclip import DECODER_TYPES, PROMPTING_TYPES
from denseclip_hf.loss_denseclip import UpsampledCrossEntropy, pixel_cross_entropy
from denseclip_hf.modeling_denseclip import DECODERS, PROMPTINGS, DenseClipQuickGelu, drop_path


def comparable(config: DenseClipConfig) -> dict:
    """The config as a dict without the fields that loading legitimately fills in (path, dtype)."""
    settings = config.to_dict()
    for sub in ("text_config", "vision_config"):
        settings[sub] = {key: value for key, value in settings[sub].items() if key != "dtype"}
    return {key: value for key, value in settings.items() if key not in ("_name_or_path", "dtype")}


def assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------------------------------
# Every image encoder family
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(64, 64), (64, 96), (96, 48), (80, 48), (32, 32)])
def test_output_shapes(family_config, family, height, width):
    expected = ENCODER_FAMILIES[family]
    model = make_model(family_config)
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width), output_hidden_states=True, test_mode="plain")
    classes, dim, stride = len(CLASS_NAMES), family_config.projection_dim, expected.score_map_stride
    assert out.logits.shape == (2, classes, height // 4, width // 4)
    assert out.score_map.shape == (2, classes, height // stride, width // stride)
    assert out.text_embeddings.shape == (2, classes, dim)
    stem, *pyramid = out.hidden_states
    stem_stride = expected.score_map_stride if family == "vit" else 4  # the ViT's patch tokens, the ResNet's stem
    assert stem.shape[-2:] == (height // stem_stride, width // stem_stride)
    assert [tuple(level.shape) for level in pyramid] == [
        (2, channels, height // stride, width // stride)
        for channels, stride in zip(expected.pyramid_channels, (4, 8, 16, 32), strict=True)
    ]
    assert out.loss is None
    level = expected.score_map_level
    assert family_config.score_map_level == level
    # The score map joins the level of its own stride.
    assert model.decoder.neck.lateral_convs[level].in_channels == expected.pyramid_channels[level] + classes


def test_rejects_bad_pixel_values(family_config, family):
    expected = ENCODER_FAMILIES[family]
    model = make_model(family_config)
    with pytest.raises(ValueError, match=expected.bad_size_error):
        model(torch.randn(1, 3, *expected.bad_size), test_mode="plain")
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"shape \(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 64, 64))


def test_loss_is_decode_plus_weighted_identity(family_config):
    model = make_model(family_config)
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


def family_parameters(model: DenseClipForSemanticSegmentation, family: str) -> dict[str, torch.Tensor]:
    """Trainable tensors that only the image encoder of `family` has."""
    tower = model.base_model.image_encoder.vision_model
    if family == "vit":
        return {
            "vision tower": tower.encoder.layers[0].mlp.fc1.weight,
            "visual projection": model.base_model.image_encoder.visual_projection.weight,
            "pyramid": model.base_model.image_encoder.pyramid.levels[0][1].weight,
        }
    return {
        "stem": tower.stem.layers[0].conv.weight,
        "bottleneck": tower.stages[1][1].spatial.conv.weight,
        "shortcut": tower.stages[2][0].shortcut.conv.weight,
        "positions": tower.attention_pool.position_embedding,
        "pool projection": tower.attention_pool.out_proj.weight,
    }


def test_gradients_reach_trainable_parts_but_not_text_tower(family_config, family):
    model = make_model(family_config).train()
    out = model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, len(CLASS_NAMES), (2, 64, 64)))
    out.loss.backward()
    prompting = model.base_model.prompting
    trainable = {
        "contexts": prompting.context_embeddings,
        "gamma": prompting.gamma,
        "context decoder": prompting.context_decoder.layers[0].cross_attn.q_proj.weight,
        "neck": model.decoder.neck.lateral_convs[2].weight,
        "neck at the score map": model.decoder.neck.lateral_convs[family_config.score_map_level].weight,
        "head": model.decoder.head.classifier.weight,
        **family_parameters(model, family),
    }
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for name, parameter in model.base_model.text_encoder.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name


def test_tuple_output_matches_dict(family_config):
    model = make_model(family_config)
    pixel_values, labels = torch.randn(1, 3, 64, 64), torch.randint(0, 4, (1, 64, 64))
    with torch.no_grad():
        as_dict = model(pixel_values, labels=labels)
        as_tuple = model(pixel_values, labels=labels, return_dict=False)
    expected = [as_dict[key] for key in as_dict.keys()]
    assert len(as_tuple) == len(expected) == 6
    for got, want in zip(as_tuple, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_batched_equals_one_by_one(family_config):
    model = make_model(family_config)
    pixel_values = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        batched = model(pixel_values, test_mode="plain")
        single = [model(pixel_values[i : i + 1], test_mode="plain") for i in range(3)]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in single]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched.score_map, torch.cat([s.score_map for s in single]), atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(family_config, tmp_path):
    model = make_model(family_config)
    model.save_pretrained(tmp_path)
    loaded = DenseClipForSemanticSegmentation.from_pretrained(tmp_path)
    assert comparable(loaded.config) == comparable(model.config)
    assert type(loaded.config.vision_config) is type(model.config.vision_config)
    assert not any(p.requires_grad for p in loaded.base_model.text_encoder.parameters())
    torch.testing.assert_close(loaded.base_model.class_token_ids, model.base_model.class_token_ids)
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


def test_base_model_returns_the_language_guided_pyramid(family_config, family):
    """`DenseClipModel`: the pyramid with the score map joined at its level (x' = [x, s]), z_bar, z and t."""
    task_model = make_model(family_config)
    model = task_model.denseclip
    assert isinstance(model, DenseClipModel) and task_model.base_model is model
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True)
        image = model.image_encoder(pixel_values)
        task_out = task_model(pixel_values, test_mode="plain")
    expected = ENCODER_FAMILIES[family]
    level, classes = expected.score_map_level, len(CLASS_NAMES)
    assert model.pyramid_channels == [
        channels + (classes if index == level else 0) for index, channels in enumerate(expected.pyramid_channels)
    ]
    assert [feature.shape[1] for feature in out.pyramid] == model.pyramid_channels
    for index, (joined, feature) in enumerate(zip(out.pyramid, out.hidden_states[1:], strict=True)):
        if index == level:  # the score map is at the level's own stride here: concatenated unchanged
            torch.testing.assert_close(joined, torch.cat([feature, out.score_map], dim=1), rtol=0, atol=0)
        else:
            torch.testing.assert_close(joined, feature, rtol=0, atol=0)
    torch.testing.assert_close(out.global_embedding, image.global_embedding)
    torch.testing.assert_close(out.dense_embedding, image.dense_embedding)
    torch.testing.assert_close(out.score_map, pixel_text_score_map(out.dense_embedding, out.text_embeddings))
    assert out.text_embeddings.shape == (2, classes, family_config.projection_dim)
    torch.testing.assert_close(task_out.score_map, out.score_map)
    torch.testing.assert_close(task_out.text_embeddings, out.text_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(task_out.logits, task_model.decoder(out.pyramid))


def test_task_and_base_models_load_each_other(family_config, tmp_path):
    """`base_model_prefix`: a base model reads a task model's folder and the other way round."""
    task_model = make_model(family_config)
    task_model.save_pretrained(tmp_path / "task")
    base, info = DenseClipModel.from_pretrained(tmp_path / "task", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the decoder's tensors are left out silently
    assert_same_tensors(base.state_dict(), task_model.denseclip.state_dict())
    assert not any(p.requires_grad for p in base.text_encoder.parameters())
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(pixel_values).pyramid, task_model.denseclip(pixel_values).pyramid)

    base.save_pretrained(tmp_path / "base")
    task, info = DenseClipForSemanticSegmentation.from_pretrained(tmp_path / "base", output_loading_info=True)
    assert info["missing_keys"] == {f"decoder.{key}" for key in task_model.decoder.state_dict()}
    assert not info["unexpected_keys"]
    assert_same_tensors(task.denseclip.state_dict(), task_model.denseclip.state_dict())


def test_resized_position_embeddings_give_the_per_forward_interpolation(family_config, family, tmp_path):
    """Resizing once to 96 pixels (the authors' start from CLIP) equals interpolating on every 96-pixel forward."""
    model = make_model(family_config)
    resized = make_model(family_config)
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
        "denseclip.image_encoder.vision_model.embeddings.position_embedding.weight"
        if family == "vit"
        else "denseclip.image_encoder.vision_model.attention_pool.position_embedding"
    ]
    assert table.shape[0] == 1 + (96 // ENCODER_FAMILIES[family].score_map_stride) ** 2
    with pytest.raises(ValueError, match="must be a multiple of"):
        resized.resize_position_embeddings(100)


# ---------------------------------------------------------------------------------------------------------------------
# Parts chosen by the config
# ---------------------------------------------------------------------------------------------------------------------


def test_every_configurable_choice_has_a_module():
    assert set(PROMPTINGS) == set(PROMPTING_TYPES) and set(DECODERS) == set(DECODER_TYPES)
    config = DenseClipConfig()
    assert (config.prompting_type, config.decoder_type) == ("post_model", "semantic_fpn")


@pytest.mark.parametrize(
    "setting, value, message",
    [
        (
            "prompting_type",
            "prompt_tuning",
            r"`prompting_type`=prompt_tuning must be one of \('post_model', 'language_only', 'pre_model', 'none'\)",
        ),
        ("decoder_type", "mask2former", r"`decoder_type`=mask2former must be one of \('semantic_fpn', 'upernet'\)"),
    ],
)
def test_unknown_parts_name_the_choices(setting, value, message):
    with pytest.raises(ValueError, match=message):
        DenseClipConfig(**{setting: value})


# ---------------------------------------------------------------------------------------------------------------------
# Losses and the score map
# ---------------------------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("label_size", [(16, 20), (4, 5)])
def test_upsampled_cross_entropy_has_the_values_and_gradients_of_the_plain_loss(label_size):
    """The memory-lean loss (no full-resolution logits kept for the backward pass) against `F.cross_entropy` on the
    resized logits: per-pixel values, and gradients for an arbitrary weighting of the pixels."""
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 4, 5, requires_grad=True)
    labels = torch.randint(0, 7, (2, *label_size))
    labels[0, :2] = 255
    weights = torch.rand(2, *label_size)
    ours = UpsampledCrossEntropy.apply(logits, labels, 255)
    (ours_gradient,) = torch.autograd.grad((ours * weights).sum(), logits)
    resized = F.interpolate(logits, size=label_size, mode="bilinear", align_corners=False)
    expected = F.cross_entropy(resized, labels, ignore_index=255, reduction="none")
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours_gradient, expected_gradient, atol=1e-6, rtol=1e-5)
    assert (ours[0, :2] == 0).all()


def test_upsampled_cross_entropy_keeps_the_dtype_of_bfloat16_logits():
    logits = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 3, (1, 8, 8))
    losses = UpsampledCrossEntropy.apply(logits, labels, 255)
    losses.sum().backward()
    assert losses.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    resized = F.interpolate(logits.detach().float(), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses, F.cross_entropy(resized, labels, reduction="none"))


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
        joined = model.denseclip(torch.randn(1, 3, 64, 96)).pyramid
    patch = config.vision_config.patch_size
    assert out.score_map.shape == (1, len(CLASS_NAMES), 64 // patch, 96 // patch)
    assert out.logits.shape == (1, len(CLASS_NAMES), 16, 24)
    assert model.decoder.neck.lateral_convs[expected_level].in_channels == 32 + len(CLASS_NAMES)
    stride = 4 * 2**expected_level
    assert joined[expected_level].shape == (1, 32 + len(CLASS_NAMES), 64 // stride, 96 // stride)


# ---------------------------------------------------------------------------------------------------------------------
# Building on CLIP weights
# ---------------------------------------------------------------------------------------------------------------------


def test_text_encoder_reproduces_clip_prompt(tiny_clip_dir, tokenizer):
    """Contexts set to the embeddings of "a photo of a" make "[SOT] ctx cat [EOT]" CLIP's "a photo of a cat"."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "cat", 1: "dog"}, num_context_tokens=4
    ).eval()
    prompt_ids = tokenizer("a photo of a", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.base_model.prompting.context_embeddings.copy_(
            clip.text_model.embeddings.token_embedding.weight[prompt_ids]
        )
        ours = model.get_text_embeddings()
        sentences = tokenizer(["a photo of a cat", "a photo of a dog"], return_tensors="pt")
        reference = clip.get_text_features(**sentences).pooler_output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def full_causal_text_tower(text_encoder, class_token_ids: torch.Tensor, contexts: torch.Tensor) -> torch.Tensor:
    """Every position of every prompt `[SOT, contexts, name ids[1:]]` through the CLIP layers with a causal mask,
    pooled at the end token (the authors' text encoder): `contexts` `(prompts, N, width)` -> `(prompts, D)`."""
    text_model = text_encoder.text_model
    tokens = text_model.embeddings.token_embedding(class_token_ids)
    hidden_states = torch.cat([tokens[:, :1], contexts, tokens[:, 1:]], dim=1)
    length = hidden_states.shape[1]
    hidden_states = hidden_states + text_model.embeddings.position_embedding.weight[:length]
    mask = torch.full((length, length), float("-inf")).triu(1)[None, None]
    for layer in text_model.encoder.layers:
        hidden_states = layer(hidden_states, mask)
    hidden_states = text_model.final_layer_norm(hidden_states)
    end = (class_token_ids == text_model.config.eos_token_id).int().argmax(-1) + contexts.shape[1]
    return text_encoder.text_projection(hidden_states[torch.arange(len(end)), end])


@pytest.mark.parametrize("per_image", [False, True])
def test_text_encoder_shares_the_prompt_prefix_exactly(tokenizer, per_image):
    """The tower runs [SOT, contexts] once and stops after the longest name: the same embeddings and context
    gradients as every position of every prompt (names of 1 to 3 tokens, padded)."""
    names = ["wall", "traffic light", "chest of drawers", "sky", "kitchen island"]
    config = tiny_config(tokenizer, names)
    encoder = DenseClipModel(config).eval().text_encoder
    ids = torch.tensor(config.class_token_ids)
    assert len(set((ids == config.text_config.eos_token_id).int().argmax(-1).tolist())) == 3  # varied lengths
    shape = (config.num_context_tokens, config.text_config.hidden_size)
    contexts = torch.randn((3, *shape) if per_image else shape, requires_grad=True)
    ours = encoder(ids, contexts)
    grouped = contexts if per_image else contexts[None]
    reference = torch.stack(
        [full_causal_text_tower(encoder, ids, group.expand(len(names), -1, -1)) for group in grouped]
    )
    torch.testing.assert_close(ours, reference if per_image else reference[0], atol=1e-5, rtol=1e-5)
    (gradient,) = torch.autograd.grad((ours * torch.arange(ours.numel()).view_as(ours)).sum(), contexts)
    (expected,) = torch.autograd.grad((reference * torch.arange(reference.numel()).view_as(reference)).sum(), contexts)
    torch.testing.assert_close(gradient, expected, atol=1e-4, rtol=1e-4)
    other = ids.clone()
    other[1, 0] = ids[0, 1]
    with pytest.raises(ValueError, match="same start token"):
        encoder(other, contexts)


@pytest.mark.parametrize("size", [(64, 64), (96, 48)])
def test_global_embedding_is_clip_image_embedding(tiny_clip_dir, size):
    """z_bar equals CLIP's image embedding (bicubic position interpolation matches `interpolate_pos_encoding`)."""
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "cat"}, position_embedding_interpolation="bicubic"
    ).eval()
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = model.base_model.image_encoder(pixel_values).global_embedding
        reference = clip.get_image_features(pixel_values, interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", [DenseClipForSemanticSegmentation, DenseClipModel])
def test_from_clip_pretrained_loads_clip_exactly_and_initialises_the_rest(tiny_clip_dir, tokenizer, model_class):
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = model_class.from_clip_pretrained(
        tiny_clip_dir, id2label={0: "wall", 1: "traffic light"}, fpn_channels=8, decode_head_channels=8
    )
    base = model.base_model
    state = base.state_dict()
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
    torch.testing.assert_close(base.class_token_ids, torch.tensor(model.config.class_token_ids))
    # DenseCLIP's own tensors come from `_init_weights` (the model was built on the meta device).
    contexts = base.prompting.context_embeddings
    torch.testing.assert_close(base.prompting.gamma, torch.full((24,), 1e-4))
    assert 0.5 < contexts.std() < 1.5 and contexts.abs().max() <= 2
    if model_class is DenseClipForSemanticSegmentation:
        norm = model.decoder.head.scale_heads[1][0].norm
        assert torch.equal(norm.running_var, torch.ones(8)) and torch.equal(norm.running_mean, torch.zeros(8))
        assert torch.equal(model.decoder.neck.lateral_convs[0].bias, torch.zeros(8))
        assert model.decoder.head.classifier.weight.std() < 0.05
    for key, tensor in model.state_dict().items():
        assert tensor.device.type == "cpu" and (not tensor.is_floating_point() or torch.isfinite(tensor).all()), key


def test_from_clip_pretrained_then_save_uses_denseclip_keys(tiny_clip_dir, tmp_path):
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(tiny_clip_dir, id2label={0: "wall", 1: "sky"})
    model.save_pretrained(tmp_path)
    loaded, info = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert_same_tensors(loaded.state_dict(), model.state_dict())


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
    with pytest.raises(
        ValueError, match=r"not a complete CLIP checkpoint \(missing: \['denseclip.image_encoder.vision_model"
    ):
        DenseClipForSemanticSegmentation.from_clip_pretrained(
            incomplete, id2label={0: "wall"}, tokenizer=CLIPTokenizer.from_pretrained(tiny_clip_dir)
        )


def test_model_without_class_token_ids_explains_fix(tokenizer):
    model = make_model(tiny_config(tokenizer, class_token_ids=None))
    with pytest.raises(ValueError, match="tokenize_class_names"):
        model(torch.randn(1, 3, 64, 64))


# ---------------------------------------------------------------------------------------------------------------------
# Attention backends, activation checkpointing, ViT stochastic depth
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_implementation_reaches_towers(config, tmp_path, implementation):
    make_model(config).save_pretrained(tmp_path)
    model = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation=implementation)
    assert model.base_model.text_encoder.text_model.config._attn_implementation == implementation
    assert model.base_model.image_encoder.vision_model.config._attn_implementation == implementation
    reference = DenseClipForSemanticSegmentation.from_pretrained(tmp_path, attn_implementation="eager")
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, reference(pixel_values).logits, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_same_gradients(config):
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    gradients = []
    for checkpointing in (False, True):
        model = make_model(config)  # eval mode: dropout off and BatchNorm fixed outside the CLIP vision tower
        if checkpointing:
            model.activation_checkpointing_enable()
        # Checkpointing only acts in training mode; drop path is then active too, and must draw the same masks when
        # the checkpointed layers are recomputed in the backward pass.
        model.base_model.image_encoder.vision_model.train()
        torch.manual_seed(0)
        model(pixel_values, labels=labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        layer = model.base_model.image_encoder.vision_model.encoder.layers[0]
        assert layer.gradient_checkpointing == checkpointing
    assert gradients[0].keys() == gradients[1].keys()
    for name in gradients[0]:
        torch.testing.assert_close(gradients[1][name], gradients[0][name], atol=1e-6, rtol=1e-5, msg=name)


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
    encoder = model.base_model.image_encoder
    for layer, rate in zip(encoder.vision_model.encoder.layers, [0.0, 0.1, 0.2, 0.3], strict=True):
        hooks = [*layer.self_attn._forward_hooks.values(), *layer.mlp._forward_hooks.values()]
        assert [hook.args[0] for hook in hooks] == pytest.approx([rate, rate] if rate else [])
    plain = make_model(tiny_config(tokenizer, drop_path_rate=0.0)).base_model.image_encoder
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixel_values).global_embedding, plain(pixel_values).global_embedding)
        encoder.train()
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(encoder(pixel_values).global_embedding)
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2]) and not torch.allclose(runs[0], plain(pixel_values).global_embedding)


@pytest.mark.parametrize("needs_grad", [False, True])
def test_quick_gelu_has_the_values_and_gradients_of_clips_formula(needs_grad):
    inputs = torch.randn(3, 7, 64).requires_grad_(needs_grad)
    expected = inputs * torch.sigmoid(1.702 * inputs)  # CLIP's QuickGELU, written out
    with torch.set_grad_enabled(needs_grad):
        got = DenseClipQuickGelu()(inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    if needs_grad:
        upstream = torch.randn_like(got)
        (got_grad,) = torch.autograd.grad(got, inputs, upstream)
        (expected_grad,) = torch.autograd.grad(expected, inputs, upstream)
        torch.testing.assert_close(got_grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_towers_swap_only_quick_gelu_for_the_fewer_pass_one(tokenizer, hidden_act):
    config = tiny_config(tokenizer)
    config.vision_config.hidden_act = config.text_config.hidden_act = hidden_act
    model = make_model(config).base_model
    inputs = torch.randn(2, 5, 8)
    expected = inputs * torch.sigmoid(1.702 * inputs) if hidden_act == "quick_gelu" else F.gelu(inputs)
    for tower in (model.image_encoder.vision_model, model.text_encoder.text_model):
        for layer in tower.encoder.layers:
            assert isinstance(layer.mlp.activation_fn, DenseClipQuickGelu) == (hidden_act == "quick_gelu")
            torch.testing.assert_close(layer.mlp.activation_fn(inputs), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# Every prompting
# ---------------------------------------------------------------------------------------------------------------------

# The trainable parameters of each prompting (written out here, not read from the package).
PROMPTING_PARAMETERS = {
    "post_model": {"context_embeddings", "gamma", "context_decoder"},
    "language_only": {"context_embeddings"},
    "pre_model": {"queries", "context_decoder", "context_projection"},
    "none": set(),
}
# The promptings that use text (all but the CLIP + Semantic FPN baseline).
TEXT_PROMPTINGS = [name for name in PROMPTING_PARAMETERS if name != "none"]


@pytest.fixture(params=list(PROMPTING_PARAMETERS))
def prompting_config(request, tokenizer) -> DenseClipConfig:
    return tiny_config(tokenizer, prompting_type=request.param)


@pytest.mark.parametrize("prompting_type", TEXT_PROMPTINGS)
def test_prompting_shapes_and_gradients_reach_exactly_its_parameters(tokenizer, prompting_type):
    assert set(PROMPTING_PARAMETERS) == set(PROMPTING_TYPES)
    prompting_config = tiny_config(tokenizer, prompting_type=prompting_type)
    model = make_model(prompting_config).train()
    out = model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, len(CLASS_NAMES), (2, 64, 64)))
    assert out.text_embeddings.shape == (2, len(CLASS_NAMES), prompting_config.projection_dim)
    assert out.score_map.shape == (2, len(CLASS_NAMES), 4, 4)
    out.loss.backward()
    prompting = dict(model.base_model.prompting.named_parameters())
    assert {name.split(".")[0] for name in prompting} == PROMPTING_PARAMETERS[prompting_config.prompting_type]
    for name, parameter in prompting.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    for name, parameter in model.base_model.text_encoder.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name


def test_language_only_prompting_uses_the_same_text_embeddings_for_every_image(tokenizer):
    model = make_model(tiny_config(tokenizer, prompting_type="language_only"))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64), test_mode="plain")
        text_embeddings = model.get_text_embeddings()
    for image in range(3):
        torch.testing.assert_close(out.text_embeddings[image], text_embeddings, rtol=0, atol=0)


def test_pre_model_prompting_runs_the_text_tower_on_each_images_own_contexts(tokenizer):
    model = make_model(tiny_config(tokenizer, prompting_type="pre_model"))
    base = model.base_model
    pixel_values = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        out = model(pixel_values, test_mode="plain")
        contexts = base.prompting.text_contexts(base.image_encoder(pixel_values))
    assert contexts.shape == (3, model.config.num_context_tokens, model.config.text_config.hidden_size)
    assert not torch.allclose(contexts[0], contexts[1]) and not torch.allclose(contexts[1], contexts[2])
    assert base._text_embeddings_cache is None
    for image in range(3):
        with torch.no_grad():
            # Image i alone: its contexts v_pre (Eq. 4), then the text tower on those (N, width) contexts (Eq. 3).
            own_contexts = base.prompting.text_contexts(base.image_encoder(pixel_values[image : image + 1]))[0]
            own_text_embeddings = base.text_encoder(base.class_token_ids, own_contexts)
        torch.testing.assert_close(out.text_embeddings[image], own_text_embeddings, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out.text_embeddings[0], out.text_embeddings[1])
    given = torch.randn(len(CLASS_NAMES), model.config.projection_dim)
    with torch.no_grad():
        given_out = model(pixel_values, test_mode="plain", text_embeddings=given)
    torch.testing.assert_close(given_out.text_embeddings, given.expand(3, -1, -1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pre_model.*pass the image"):
        model.get_text_embeddings()
    with pytest.raises(ValueError, match="cannot be removed"):
        base.remove_text_encoder()


def test_prompting_save_and_load_round_trip(prompting_config, tmp_path):
    model = make_model(prompting_config)
    model.save_pretrained(tmp_path)
    loaded = DenseClipForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.prompting_type == prompting_config.prompting_type
    assert_same_tensors(loaded.state_dict(), model.state_dict())
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The CLIP + Semantic FPN baseline (prompting_type="none"): no text at all
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def baseline_config(tokenizer, family) -> DenseClipConfig:
    return tiny_config(tokenizer, vision_config=ENCODER_FAMILIES[family].vision_config, prompting_type="none")


def test_baseline_builds_no_text_parts(baseline_config, family):
    model = make_model(baseline_config)
    assert model.base_model.text_encoder is None
    assert model.base_model.pyramid_channels == ENCODER_FAMILIES[family].pyramid_channels
    names = list(model.state_dict())
    for part in ("text_encoder", "attention_pool", "visual_projection", "post_layernorm", "prompting"):
        assert not [name for name in names if part in name], part


def test_baseline_is_the_semantic_fpn_on_the_image_pyramid(baseline_config, family):
    model = make_model(baseline_config)
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, len(CLASS_NAMES), (2, 64, 64))
    with torch.no_grad():
        out = model(pixel_values, labels=labels)
        # Independently: the decoder on the image encoder's own pyramid, and the plain pixel cross-entropy.
        expected = model.decoder(model.base_model.image_encoder(pixel_values).pyramid)
    assert out.score_map is None and out.text_embeddings is None and out.identity_loss is None
    assert out.logits.shape == (2, len(CLASS_NAMES), 16, 16)
    torch.testing.assert_close(out.logits, expected)
    upsampled = F.interpolate(out.logits, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.loss, F.cross_entropy(upsampled, labels))
    torch.testing.assert_close(out.loss, out.decode_loss, rtol=0, atol=0)
    model.train()
    model(pixel_values, labels=labels).loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad and parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    base = model.base_model(pixel_values)
    assert base.score_map is base.global_embedding is base.dense_embedding is base.text_embeddings is None


def test_baseline_has_no_text_to_embed_or_remove(tokenizer):
    model = make_model(tiny_config(tokenizer, prompting_type="none"))
    with pytest.raises(ValueError, match="uses no text"):
        model.get_text_embeddings()
    with pytest.raises(ValueError, match="no text tower to remove"):
        model.remove_text_encoder()
    with pytest.raises(ValueError, match="do not pass text_embeddings"):
        model(torch.randn(1, 3, 64, 64), test_mode="plain", text_embeddings=torch.zeros(len(CLASS_NAMES), 24))


def test_baseline_from_clip_takes_the_image_tower_alone(tiny_clip_dir):
    """From CLIP, the baseline loads the image tower bit-exactly and leaves the text tower and projection out."""
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        tiny_clip_dir, id2label=dict(enumerate(CLASS_NAMES)), prompting_type="none"
    )
    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    own = model.base_model.image_encoder.vision_model.state_dict()
    expected = {key: value for key, value in clip.vision_model.state_dict().items() if "post_layernorm" not in key}
    assert_same_tensors(own, expected)
    assert model.base_model.text_encoder is None
