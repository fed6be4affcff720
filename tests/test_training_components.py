"""Training building blocks: schedule, parameter groups, augmentation, metrics, data, checkpoints, arguments."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from clip_reference import CLIP
from conftest import tiny_config
from PIL import Image

from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation, DenseClipResNetConfig
from denseclip_hf.checkpointing import (
    find_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from denseclip_hf.data import (
    ADE20K_CLASS_NAMES,
    EpochShuffleSampler,
    find_image_label_pairs,
    load_segmentation_data,
)
from denseclip_hf.metrics import confusion_matrix, segmentation_metrics
from denseclip_hf.reporting import model_card
from denseclip_hf.synthetic import SYNTHETIC_CLASS_NAMES, load_synthetic_dataset
from denseclip_hf.training import (
    RECIPES,
    gradient_accumulation_steps,
    load_model,
    parameter_groups,
    parse_training_args,
    poly_schedule_with_warmup,
)
from denseclip_hf.transforms import SegmentationAugmentation, photometric_distortion, random_crop

# ---------------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------------


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
    assert not any(name.startswith("denseclip.text_encoder.") for name in placed)
    for name, group in placed.items():
        assert group["lr"] == pytest.approx(1e-5 if name.startswith("denseclip.image_encoder.") else 1e-4)
    no_decay = {name for name, group in placed.items() if group["weight_decay"] == 0}
    assert {"denseclip.prompting.context_embeddings", "denseclip.prompting.gamma"} <= no_decay
    assert (
        all(name.endswith("bias") for name in trainable if name.endswith("bias"))
        and {name for name in trainable if name.endswith("bias")} <= no_decay
    )
    norm_weights = {
        "denseclip.image_encoder.vision_model.pre_layrnorm.weight",
        "decoder.head.scale_heads.0.0.norm.weight",
    }
    assert norm_weights <= no_decay
    assert placed["decoder.head.classifier.weight"]["weight_decay"] == 1e-4
    assert placed["denseclip.image_encoder.vision_model.embeddings.patch_embedding.weight"]["weight_decay"] == 1e-4

    optimizer = torch.optim.AdamW(groups)
    model(torch.randn(2, 3, 64, 64), labels=torch.randint(0, 4, (2, 64, 64))).loss.backward()
    optimizer.step()
    frozen = [parameter for parameter in model.base_model.text_encoder.parameters()]
    assert all(not parameter.requires_grad and parameter not in optimizer.state for parameter in frozen)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------------------


def colour_coded_sample(size=(90, 120)):
    """An image whose colour encodes its label (4 vertical bands) so that alignment can be checked after augmenting."""
    label = np.repeat(np.arange(4), size[1] // 4)[None].repeat(size[0], axis=0).astype(np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)
    return Image.fromarray(palette[label]), Image.fromarray(label), palette


def test_augmentation_is_deterministic_aligned_and_padded():
    image, label, palette = colour_coded_sample()
    augment = SegmentationAugmentation(
        crop_size=64, scale=(240, 90), ratio_range=(0.5, 2.0), photometric_distortion=False
    )
    outputs = [augment(image, label, np.random.default_rng([0, 0, index])) for index in range(12)]
    again = augment(image, label, np.random.default_rng([0, 0, 3]))
    assert all(np.array_equal(a, b) for a, b in zip(outputs[3], again, strict=True))
    assert not np.array_equal(outputs[3][0], outputs[4][0])
    mean, std = np.array(augment.image_mean), np.array(augment.image_std)
    padded = 0
    for pixel_values, labels in outputs:
        assert pixel_values.shape == (3, 64, 64) and pixel_values.dtype == np.float32 and labels.shape == (64, 64)
        assert set(np.unique(labels)) <= {0, 1, 2, 3, 255}
        rgb = (pixel_values.transpose(1, 2, 0) * std + mean) * 255
        valid = labels != 255
        matches = np.abs(rgb[valid] - palette[labels[valid]]).max(axis=1) < 40
        assert matches.mean() > 0.9  # label and image stay aligned (bilinear edges may differ)
        padded += (~valid).any()
        assert np.all(pixel_values[:, ~valid] == 0)  # padding is 0 after normalization, label 255
    assert padded > 0  # ratios < 0.73 make the image smaller than the crop


def test_random_crop_avoids_a_dominant_class():
    label = np.zeros((100, 100), dtype=np.int64)
    label[:, 60:] = 1  # about half of the 50x50 windows are more than 75% class 0
    image = np.zeros((100, 100, 3), dtype=np.uint8)

    def balanced_crops(cat_max_ratio: float) -> int:
        crops = [random_crop(image, label, (50, 50), cat_max_ratio, np.random.default_rng(s))[1] for s in range(20)]
        return sum(np.bincount(crop.ravel(), minlength=2).max() / crop.size < 0.75 for crop in crops)

    assert balanced_crops(0.75) == 20 and balanced_crops(1.0) < 15


def test_photometric_distortion_is_seeded():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    first = photometric_distortion(image, np.random.default_rng(5))
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert np.array_equal(first, photometric_distortion(image, np.random.default_rng(5)))
    assert any(not np.array_equal(image, photometric_distortion(image, np.random.default_rng(s))) for s in range(4))


def test_epoch_shuffle_sampler_depends_on_seed_and_epoch_only():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(index for _, index in first) == list(range(10)) and {epoch for epoch, _ in second} == {1}
    assert [i for _, i in first] != [i for _, i in second]
    other = EpochShuffleSampler(10, seed=3)
    other.set_epoch(1)
    assert list(other) == second


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def test_confusion_matrix_and_metrics():
    labels = torch.tensor([[0, 0, 1, 1], [2, 255, 1, 0]])
    predictions = torch.tensor([[0, 1, 1, 1], [0, 2, 1, 3]])
    confusion = confusion_matrix(predictions, labels, num_labels=4)
    assert confusion.tolist() == [[1, 1, 0, 1], [0, 3, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    metrics = segmentation_metrics(confusion.numpy(), {0: "a", 1: "b", 2: "c", 3: "d"})
    # IoU: a = 1 / (3 + 2 - 1), b = 3 / (3 + 4 - 3), c = 0, d = 0 (predicted, never labelled).
    assert metrics["per_category_iou"] == pytest.approx({"a": 0.25, "b": 0.75, "c": 0.0, "d": 0.0})
    assert metrics["mean_iou"] == pytest.approx(0.25)
    assert metrics["per_category_accuracy"]["d"] is None
    assert metrics["mean_accuracy"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["overall_accuracy"] == pytest.approx(4 / 7)
    absent = segmentation_metrics(np.diag([5, 0]), {0: "a", 1: "b"})
    assert absent["per_category_iou"]["b"] is None and absent["mean_iou"] == 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_synthetic_dataset_is_deterministic_and_named():
    train = load_synthetic_dataset("train", num_samples=6, image_size=64)
    again = load_synthetic_dataset("train", num_samples=6, image_size=64)
    validation = load_synthetic_dataset("validation", num_samples=6, image_size=64)
    assert train.features["classes"].feature.names == SYNTHETIC_CLASS_NAMES
    for index in range(6):
        image, label = np.asarray(train[index]["image"]), np.asarray(train[index]["label"])
        assert image.shape == (64, 64, 3) and label.shape == (64, 64)
        assert np.array_equal(image, np.asarray(again[index]["image"]))
        assert not np.array_equal(image, np.asarray(validation[index]["image"]))
        present = set(np.unique(label).tolist())
        assert present <= set(range(len(SYNTHETIC_CLASS_NAMES))) | {255} and len(present - {255}) >= 3
        assert train[index]["classes"] == sorted(present - {255})


def write_pair(image_path: Path, label_path: Path, value: int = 1) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(image_path)
    Image.new("L", (8, 6), value).save(label_path)


def test_ade20k_and_voc_folder_layouts(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split, name in (("training", "ADE_train_1"), ("training", "ADE_train_2"), ("validation", "ADE_val_1")):
        write_pair(ade / "images" / split / f"{name}.jpg", ade / "annotations" / split / f"{name}.png")
    data = load_segmentation_data(train_dir=str(ade))
    assert (len(data.train), len(data.validation)) == (2, 1)
    assert list(data.id2label.values()) == list(ADE20K_CLASS_NAMES)
    assert np.asarray(data.train[0]["label"]).max() == 1

    voc = tmp_path / "VOC2012"
    for name in ("a", "b", "c"):
        write_pair(voc / "JPEGImages" / f"{name}.jpg", voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    assert [image.stem for image, _ in find_image_label_pairs(voc, "validation")] == ["c"]
    assert len(load_segmentation_data(train_dir=str(voc)).id2label) == 21

    flat = tmp_path / "flat"
    write_pair(flat / "images" / "x.png", flat / "labels" / "x.png")
    (tmp_path / "names.json").write_text(json.dumps({"0": "road", "1": "car"}))
    with pytest.raises(ValueError, match="--validation_dir"):
        load_segmentation_data(train_dir=str(flat), id2label_file=str(tmp_path / "names.json"))
    data = load_segmentation_data(
        train_dir=str(flat), validation_dir=str(flat), id2label_file=str(tmp_path / "names.json")
    )
    assert data.id2label == {0: "road", 1: "car"} and len(data.validation) == 1
    (flat / "images" / "y.png").write_bytes((flat / "images" / "x.png").read_bytes())
    with pytest.raises(ValueError, match="no label PNG"):
        find_image_label_pairs(flat, "train")


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "random_states_0.pkl").write_bytes(b"rng")
    if complete:
        write_manifest(folder, step)
    return folder


def test_latest_checkpoint_skips_partial_and_corrupt_ones(tmp_path, caplog):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # crashed before its manifest: cannot be complete
    corrupt = fake_checkpoint(tmp_path, 40)
    with open(corrupt / "model.safetensors", "r+b") as handle:
        handle.write(b"\xff")  # same size, altered content
    truncated = fake_checkpoint(tmp_path, 50)
    (truncated / "random_states_0.pkl").write_bytes(b"r")
    (tmp_path / "checkpoints" / ".tmp-step_60").mkdir()
    with caplog.at_level(logging.WARNING):
        assert find_latest_checkpoint(tmp_path).name == "step_20"
    assert "step_50" in caplog.text and "step_40" in caplog.text and "step_30" in caplog.text
    assert "SHA-256" in verify_checkpoint(corrupt)
    assert prune_checkpoints(tmp_path, total_limit=2)  # keeps the 2 newest with a manifest (not hashed: too slow)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".tmp-step_60", "step_40", "step_50"]


class CrashingAccelerator:
    """Stands in for `Accelerator` in one process; its `save_state` writes part of the state, then fails."""

    class project_configuration:  # noqa: N801
        save_on_each_node = False

    is_main_process = is_local_main_process = True

    def __init__(self, crash: bool):
        self.crash = crash

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir(parents=True)
        Path(folder, "model.safetensors").write_bytes(b"weights")
        if self.crash:
            raise RuntimeError("killed while saving")
        Path(folder, "optimizer.bin").write_bytes(b"state")


def test_save_checkpoint_is_atomic_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(CrashingAccelerator(crash=False), tmp_path, step, total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint(CrashingAccelerator(crash=True), tmp_path, 4, total_limit=2)
    assert not (tmp_path / "checkpoints" / "step_4").exists()
    assert find_latest_checkpoint(tmp_path).name == "step_3"
    save_checkpoint(CrashingAccelerator(crash=False), tmp_path, 5, total_limit=2)  # cleans the leftover temp folder
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_5"]


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------


def test_recipe_defaults_and_overrides(tmp_path):
    args = parse_training_args(["--output_dir", str(tmp_path)])
    assert args.recipe == "synthetic" and args.learning_rate == RECIPES["synthetic"].learning_rate
    paper = parse_training_args(
        ["--recipe", "ade20k-vit-b16", "--output_dir", str(tmp_path), "--weight_decay", "0.01"]
    )
    assert (paper.learning_rate, paper.weight_decay, paper.image_encoder_lr_multiplier) == (1e-4, 0.01, 0.1)
    assert (paper.max_train_steps, paper.total_train_batch_size, paper.crop_size) == (80_000, 32, 640)
    assert (paper.image_scale, paper.ratio_range, paper.num_warmup_steps) == ([2048, 640], [0.5, 2.0], 1500)
    assert paper.loss_reduction == "mean_all_pixels"
    assert gradient_accumulation_steps(paper, num_processes=8) == 1
    assert gradient_accumulation_steps(paper, num_processes=2) == 4
    epochs = parse_training_args(
        ["--recipe", "ade20k-vit-b16", "--num_train_epochs", "3", "--output_dir", str(tmp_path)]
    )
    assert epochs.max_train_steps is None
    with pytest.raises(ValueError, match="multiple of"):
        gradient_accumulation_steps(paper, num_processes=3)
    for name, paper_miou in (("ade20k-rn50", (43.5, 44.7)), ("ade20k-rn101", (45.1, 46.5))):
        resnet = parse_training_args(["--recipe", name, "--output_dir", str(tmp_path)])
        assert (resnet.crop_size, resnet.image_scale, resnet.max_train_steps) == (512, [2048, 512], 80_000)
        assert (resnet.learning_rate, resnet.image_encoder_lr_multiplier, resnet.total_train_batch_size) == (
            1e-4,
            0.1,
            32,
        )
        assert RECIPES[name].paper_miou == paper_miou


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


def test_model_card_describes_resnet_models(tmp_path):
    config = DenseClipConfig(vision_config=DenseClipResNetConfig(), id2label={0: "sky", 1: "tree"})
    args = parse_training_args(["--recipe", "ade20k-rn50", "--output_dir", str(tmp_path)])
    per_class = {"sky": 0.5, "tree": None}
    results = {"eval_mean_iou": 0.5, "eval_mean_accuracy": 0.5, "eval_overall_accuracy": 0.5, "eval_samples": 1}
    results.update(eval_per_category_iou=per_class, eval_per_category_accuracy=per_class, train_steps=1)
    card = model_card(config, {**results, "total_train_batch_size": 32}, args, "someone/denseclip-rn50")
    assert "# DenseCLIP ResNet (layers [3, 4, 6, 3], width 64)" in card and "43.5 / 44.7 mIoU" in card


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset_name", "x", "--train_dir", "."], "either --dataset_name or --train_dir"),
        (["--validation_dir", "."], "--validation_dir needs --train_dir"),
        (["--train_dir", "/does/not/exist"], "does not exist"),
        (["--learning_rate", "-1"], "--learning_rate must be > 0"),
        (["--crop_size", "100"], "multiple of 32"),
        (["--ratio_range", "2", "1"], "--ratio_range"),
        (["--max_train_steps", "10", "--num_warmup_steps", "10"], "--num_warmup_steps"),
        (["--checkpointing_steps", "often"], "--checkpointing_steps"),
        (["--resume_from_checkpoint", "/nowhere"], "--resume_from_checkpoint"),
        (["--recipe", "ade20k-rn18"], "invalid choice"),
        (["--per_device_train_batch_size", "0"], "must be > 0"),
    ],
)
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as error:
        parse_training_args([*argv, "--output_dir", str(tmp_path / "out")])
    assert error.value.code == 2 and message in capsys.readouterr().err


def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    fake_checkpoint(tmp_path, 5)
    with pytest.raises(SystemExit):
        parse_training_args(["--output_dir", str(tmp_path)])
    assert "--resume_from_checkpoint latest" in capsys.readouterr().err
    assert parse_training_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest"])
    assert parse_training_args(["--output_dir", str(tmp_path), "--overwrite_output_dir"])
