"""The paper's optimizer and schedule: mmcv's poly learning rate with warmup, AdamW parameter groups."""

import collections
import copy
import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from conftest import FIXTURES, tiny_config

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.checkpoint_conversion import convert_keys
from denseclip_hf.convert_denseclip_original_to_hf import denseclip_rules, infer_config
from denseclip_hf.training.arguments import OptimizationArguments, parse_training_args
from denseclip_hf.training.loop import flushing_denormals
from denseclip_hf.training.model_loading import convert_batchnorm_for_launch, uses_sync_batchnorm
from denseclip_hf.training.optimization import (
    WEIGHT_DECAY_EXEMPTIONS,
    build_optimizer,
    parameter_groups,
    poly_schedule_with_warmup,
)
from denseclip_hf.training.recipes import RECIPES


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


def placed_groups(model, groups) -> dict[str, dict]:
    """Parameter name -> its group, checking that each trainable parameter is in exactly one group."""
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    placed = {names[id(parameter)]: group for group in groups for parameter in group["params"]}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(placed) == trainable and sum(len(group["params"]) for group in groups) == len(trainable)
    return placed


AUTHORS_GROUPS = json.loads((FIXTURES / "official_denseclip_optimizer_groups.json").read_text())["models"]


@pytest.mark.parametrize("model_name", sorted(AUTHORS_GROUPS))
def test_parameter_groups_match_the_authors_mmcv_groups(model_name, tokenizer):
    """Every parameter of the authors' full-size ViT-B/16, RN50 and RN101 models (their state_dict keys, mapped
    through the converter) gets the learning rate and weight decay that mmcv's `build_optimizer` gives it."""
    authors = AUTHORS_GROUPS[model_name]
    optimizer, custom_keys = authors["optimizer"], authors["optimizer"]["paramwise_cfg"]["custom_keys"]
    state_dict = {name: torch.empty(shape, device="meta") for name, (shape, _, _) in authors["parameters"].items()}
    config = infer_config(state_dict, ["wall"] * 150)
    with init_empty_weights():
        model = DenseClipForSemanticSegmentation(config)
    groups = parameter_groups(model, optimizer["lr"], optimizer["weight_decay"], custom_keys["backbone"]["lr_mult"])
    placed = placed_groups(model, groups)
    rules = denseclip_rules(config.image_encoder_family)
    covered, matched = set(), collections.Counter()
    for name, (_, lr_mult, decay_mult) in authors["parameters"].items():
        for ours in convert_keys({name: state_dict[name]}, rules, name):
            covered.add(ours)
            if lr_mult == 0:  # the text encoder: frozen here, so in no group and without optimizer state
                assert ours not in placed, ours
                matched["lr 0 (frozen)"] += 1
                continue
            group = placed[ours]
            assert (group["lr"], group["weight_decay"]) == pytest.approx(
                (optimizer["lr"] * lr_mult, optimizer["weight_decay"] * decay_mult)
            ), (name, ours)
            matched[f"lr_mult {lr_mult}, decay_mult {decay_mult}"] += 1
    assert covered == set(dict(model.named_parameters()))
    # The authors' groups are all present: backbone, heads and prompting, and the norms without weight decay.
    assert {"lr 0 (frozen)", "lr_mult 0.1, decay_mult 1.0", "lr_mult 1.0, decay_mult 1.0", "lr_mult 1.0, "
            "decay_mult 0.0"} == set(matched)  # fmt: skip


def test_extended_weight_decay_exemptions(tokenizer):
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer))
    groups = parameter_groups(
        model,
        learning_rate=1e-4,
        weight_decay=1e-4,
        image_encoder_lr_multiplier=0.1,
        weight_decay_exemptions="extended",
    )
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    placed = placed_groups(model, groups)
    trainable = set(placed)
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

    pre_model = DenseClipForSemanticSegmentation(tiny_config(tokenizer, prompting_type="pre_model"))
    pre_model_groups = parameter_groups(
        pre_model,
        learning_rate=1e-4,
        weight_decay=1e-4,
        image_encoder_lr_multiplier=0.1,
        weight_decay_exemptions="extended",
    )
    queries = placed_groups(pre_model, pre_model_groups)["denseclip.prompting.queries"]  # q of Eq. 4
    assert (queries["weight_decay"], queries["lr"]) == (0, 1e-4)

    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 4, (2, 64, 64))).loss.backward()
    optimizer.step()
    frozen = [parameter for parameter in model.base_model.text_encoder.parameters()]
    assert all(not parameter.requires_grad and parameter not in optimizer.state for parameter in frozen)


@pytest.mark.parametrize("device_type, fused", [("cpu", True), ("mps", None)])
def test_build_optimizer_takes_the_fused_kernel_with_the_same_update(tokenizer, device_type, fused):
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer))
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, 1e-3, 1e-4, 0.1, device_type=device_type)
    assert optimizer.defaults["fused"] is fused
    expected = torch.optim.AdamW(parameter_groups(reference, 1e-3, 1e-4, 0.1), foreach=False)
    assert [group["lr"] for group in optimizer.param_groups] == [group["lr"] for group in expected.param_groups]
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    for _ in range(2):
        for net, opt in ((model, optimizer), (reference, expected)):
            torch.manual_seed(1)  # the same dropout masks
            net(pixel_values, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, parameter), other in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(parameter, other, atol=1e-6, rtol=1e-5, msg=name)


def test_unknown_weight_decay_exemptions_are_refused(tokenizer):
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer))
    with pytest.raises(ValueError, match="'none'.*authors"):
        parameter_groups(model, 1e-4, 1e-4, 0.1, weight_decay_exemptions="none")


@pytest.mark.parametrize(
    ("enabled", "num_processes", "device_type", "expected"),
    [
        (True, 2, "cuda", True),
        (True, 8, "xpu", True),
        (True, 1, "cuda", False),  # one process: nothing to synchronize
        (False, 2, "cuda", False),  # --no_sync_batchnorm
        (True, 2, "cpu", False),  # torch's SyncBatchNorm raises on CPU tensors
        (True, 2, "mps", False),
    ],
)
def test_sync_batchnorm_decision(enabled, num_processes, device_type, expected):
    assert uses_sync_batchnorm(enabled, num_processes, device_type) is expected


def test_sync_batchnorm_conversion_keeps_the_model(tokenizer, caplog):
    """Every BatchNorm becomes a SyncBatchNorm with the same tensors; without a process group (as here, on CPU,
    where torch's SyncBatchNorm cannot synchronize) it computes what BatchNorm does."""
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(tiny_config(tokenizer)).train()
    batch_norms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert batch_norms
    reference = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    torch.manual_seed(1)  # the same drop-path draws in both forwards
    expected = model(images, labels=labels).loss

    with caplog.at_level(logging.WARNING):
        assert convert_batchnorm_for_launch(model, True, 2, "cpu") is model
    assert "per process" in caplog.text
    assert convert_batchnorm_for_launch(model, True, 1, "cuda") is model
    model.load_state_dict(reference)
    converted = convert_batchnorm_for_launch(model, True, 2, "cuda")
    modules = dict(converted.named_modules())
    assert all(type(modules[name]) is torch.nn.SyncBatchNorm for name in batch_norms)
    assert not any(type(module) is torch.nn.BatchNorm2d for module in modules.values())
    assert converted.state_dict().keys() == reference.keys()
    assert all(torch.equal(converted.state_dict()[name], tensor) for name, tensor in reference.items())
    torch.manual_seed(1)
    torch.testing.assert_close(converted(images, labels=labels).loss, expected)


def test_optimizer_group_flags(tmp_path):
    """The authors' grouping and SyncBatchNorm are the defaults of every recipe; both flags turn them off."""
    for recipe in RECIPES:
        default = parse_training_args(["--recipe", recipe, "--output_dir", str(tmp_path)]).optimization
        assert (default.weight_decay_exemptions, default.sync_batchnorm) == ("authors", True)
    flags = ["--output_dir", str(tmp_path), "--weight_decay_exemptions", "extended", "--no_sync_batchnorm"]
    changed = parse_training_args(flags).optimization
    assert (changed.weight_decay_exemptions, changed.sync_batchnorm) == ("extended", False)
    with pytest.raises(SystemExit):
        parse_training_args(["--output_dir", str(tmp_path), "--weight_decay_exemptions", "none"])
    choices = {field.name: field.metadata.get("choices") for field in dataclasses.fields(OptimizationArguments)}
    assert choices["weight_decay_exemptions"] == list(WEIGHT_DECAY_EXEMPTIONS)


@pytest.mark.parametrize("enabled", [True, False])
def test_denormals_are_flushed_for_the_run_only(enabled):
    """`flushing_denormals` (the training loop's `--flush_denormal`, on by default on CPU): inside the block a float32
    denormal (1e-39) reads as zero when enabled; after it, and when disabled, it keeps its IEEE value."""
    denormal = torch.tensor([1e-39], dtype=torch.float32)
    ieee_value = float(np.float32(1e-39) * np.float32(2))
    with flushing_denormals(enabled):
        inside = (denormal * 2).item()
    assert inside == (0.0 if enabled else ieee_value)
    assert (denormal * 2).item() == ieee_value
