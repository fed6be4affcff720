"""The paper's optimizer and schedule: mmcv's poly learning rate with warmup, AdamW parameter groups."""

import pytest
import torch
from conftest import tiny_config

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.training.optimization import parameter_groups, poly_schedule_with_warmup


def mmcv_poly_lr(step, base_lr, max_steps, warmup_steps, power=0.9, min_lr=1e-6, warmup_ratio=1e-6):
    """mmcv 1.x `PolyLrUpdaterHook.get_lr` + `LrUpdaterHook.get_warmup_lr('linear')`, written as mmcv does."""
    coeff = (1 - step / max_steps) ** power
    regular_lr = (base_lr - min_lr) * coeff + min_lr
    if step >= warmup_steps:
        return regular_lr
    k = (1 - step / warmup_steps) * (1 - warmup_ratio)
    return regular_lr * (1 - k)


def test_poly_schedule_with_warmup_matches_mmcv():
    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": weights[:1], "lr": 1e-4}, {"params": weights[1:], "lr": 1e-5}])
    scheduler = poly_schedule_with_warmup(optimizer, num_training_steps=200, num_warmup_steps=30)
    for step in range(200):
        for group, base_lr in zip(optimizer.param_groups, (1e-4, 1e-5), strict=True):
            assert group["lr"] == pytest.approx(mmcv_poly_lr(step, base_lr, 200, 30), rel=1e-9, abs=1e-15)
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-6, 1e-6])


def test_parameter_groups_follow_the_paper(tokenizer):
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer))
    groups = parameter_groups(model, learning_rate=1e-4, weight_decay=1e-4, image_encoder_lr_multiplier=0.1)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    placed = {names[id(parameter)]: group for group in groups for parameter in group["params"]}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(placed) == trainable and sum(len(group["params"]) for group in groups) == len(trainable)
    text_encoder = {names[id(parameter)] for parameter in model.base_model.text_encoder.parameters()}
    image_encoder = {names[id(parameter)] for parameter in model.base_model.image_encoder.parameters()}
    assert text_encoder and image_encoder and not text_encoder & set(placed)
    assert image_encoder < set(placed)  # the image encoder trains, and it is not all that trains
    for name, group in placed.items():
        assert group["lr"] == pytest.approx(1e-5 if name in image_encoder else 1e-4)
    no_decay = {name for name, group in placed.items() if group["weight_decay"] == 0}
    contexts_and_gamma = {name for name in placed if name.endswith(("context_embeddings", "gamma"))}
    assert len(contexts_and_gamma) == 2 and contexts_and_gamma <= no_decay  # the learnable contexts p and gamma
    assert (
        all(name.endswith("bias") for name in trainable if name.endswith("bias"))
        and {name for name in trainable if name.endswith("bias")} <= no_decay
    )
    vision_model, decode_head = model.base_model.image_encoder.vision_model, model.decoder.head
    norm_weights = {names[id(vision_model.pre_layrnorm.weight)], names[id(decode_head.scale_heads[0][0].norm.weight)]}
    assert norm_weights <= no_decay
    assert placed[names[id(decode_head.classifier.weight)]]["weight_decay"] == 1e-4
    assert placed[names[id(vision_model.embeddings.patch_embedding.weight)]]["weight_decay"] == 1e-4

    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 4, (2, 64, 64))).loss.backward()
    optimizer.step()
    frozen = [parameter for parameter in model.base_model.text_encoder.parameters()]
    assert all(not parameter.requires_grad and parameter not in optimizer.state for parameter in frozen)
