"""Detection training (`examples/train_det.py`): the authors' optimizer groups and step schedule against independent
computations of mmcv's rules, the aspect-ratio grouped sampler (mmdet's `GroupSampler`), the flip augmentation against
NumPy brute forces and against the processor on mirrored inputs, batch collation, recipes and bad input."""

import dataclasses

import numpy as np
import pytest
import torch
from detection_fixtures import authors_state_dict, tiny_config
from PIL import Image

from denseclip_hf import (
    DenseClipDetectionImageProcessor,
    DenseClipForInstanceSegmentation,
    DenseClipForObjectDetection,
)
from denseclip_hf.checkpoint_conversion import convert_keys
from denseclip_hf.convert_denseclip_original_to_hf import authors_detection_rules
from denseclip_hf.training.detection_arguments import parse_detection_training_args
from denseclip_hf.training.detection_batches import (
    AspectRatioGroupSampler,
    DetectionAugmentation,
    aspect_ratio_groups,
    collate_detection_batch,
    flip_horizontally,
)
from denseclip_hf.training.optimization import parameter_groups, step_schedule_with_warmup
from denseclip_hf.training.recipes import DETECTION_RECIPES

# mmcv 1.x `paramwise_cfg.custom_keys` of every authors' detection config: key -> (lr_mult, decay_mult).
AUTHORS_CUSTOM_KEYS = {"backbone": (0.1, 1.0), "text_encoder": (0.0, 1.0), "norm": (1.0, 0.0)}


def mmcv_multipliers(name: str) -> tuple[float, float]:
    """mmcv's `DefaultOptimizerConstructor.add_params`: the longest custom key (ties alphabetically) that is in
    the parameter's name decides, else (1, 1)."""
    for key in sorted(sorted(AUTHORS_CUSTOM_KEYS), key=len, reverse=True):
        if key in name:
            return AUTHORS_CUSTOM_KEYS[key]
    return 1.0, 1.0


def mmcv_step_lr(iteration: int, epoch: int, base_lr: float, steps, warmup_iters: int, warmup_ratio: float) -> float:
    """mmcv 1.x `StepLrUpdaterHook.get_lr` (by epoch, gamma 0.1) and `LrUpdaterHook.get_warmup_lr('linear')` (by
    iteration), as mmcv writes them."""
    exp = len(steps)
    for index, step in enumerate(steps):
        if epoch < step:
            exp = index
            break
    regular_lr = base_lr * 0.1**exp
    if iteration >= warmup_iters:
        return regular_lr
    k = (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return regular_lr * (1 - k)


@pytest.mark.parametrize(
    ("steps_per_epoch", "milestones", "warmup"), [(7, (8, 11), 20), (50, (8, 11), 500), (3, (1,), 0), (4, (), 5)]
)
def test_step_schedule_matches_mmcv(steps_per_epoch, milestones, warmup):
    weights = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    base = (2e-4, 2e-5, 0.0)
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": lr} for weight, lr in zip(weights, base, strict=True)])
    scheduler = step_schedule_with_warmup(optimizer, steps_per_epoch, milestones, 0.1, warmup, 0.001)
    for iteration in range(12 * steps_per_epoch):
        epoch = iteration // steps_per_epoch
        expected = [mmcv_step_lr(iteration, epoch, lr, milestones, warmup, 0.001) for lr in base]
        assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(expected, rel=1e-12, abs=0)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("name", ["retinanet", "maskrcnn", "clip_retinanet", "clip_maskrcnn"])
@pytest.mark.parametrize("text_gradients", [False, True])
def test_parameter_groups_match_mmcv_on_the_authors_detectors(name, text_gradients):
    """Every parameter of the authors' fixture detectors (their state_dict keys, mapped through the converter) gets
    the learning rate and weight decay of mmcv's `custom_keys` rule; the text tower is absent (frozen) or at lr 0."""
    lr, weight_decay = 2e-4, 1e-4
    model_class = DenseClipForObjectDetection if name.endswith("retinanet") else DenseClipForInstanceSegmentation
    model = model_class(tiny_config(name))
    if text_gradients and model.base_model.text_encoder is not None:
        model.base_model.text_encoder.requires_grad_(True)
    groups = parameter_groups(model, lr, weight_decay, AUTHORS_CUSTOM_KEYS["backbone"][0])
    names = {id(parameter): ours for ours, parameter in model.named_parameters()}
    placed = {names[id(parameter)]: group for group in groups for parameter in group["params"]}
    state_dict = authors_state_dict(name)
    rules = authors_detection_rules(state_dict)
    trainable = {ours for ours, parameter in model.named_parameters() if parameter.requires_grad}
    seen = set()
    for authors_name, tensor in state_dict.items():
        lr_mult, decay_mult = mmcv_multipliers(authors_name)
        for ours in convert_keys({authors_name: tensor}, rules, authors_name):
            if ours not in dict(model.named_parameters()):
                continue  # buffers (BatchNorm statistics)
            seen.add(ours)
            if lr_mult == 0 and not text_gradients:
                assert ours not in placed, ours
                continue
            group = placed[ours]
            assert (group["lr"], group["weight_decay"] * (group["lr"] != 0)) == pytest.approx(
                (lr * lr_mult, weight_decay * decay_mult * (lr_mult != 0))
            ), (authors_name, ours)
    assert seen == set(dict(model.named_parameters()))
    assert set(placed) == trainable


def mmdet_group_sampler_counts(groups: np.ndarray, batch_size: int) -> dict[int, int]:
    """Samples per group in one epoch of mmdet's `GroupSampler`: each group padded up to a multiple of the batch."""
    return {int(group): int(np.ceil((groups == group).sum() / batch_size) * batch_size) for group in np.unique(groups)}


@pytest.mark.parametrize(("num_samples", "batch_size"), [(23, 2), (10, 4), (7, 8), (16, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_aspect_ratio_sampler_batches_one_group(num_samples, batch_size, seed):
    rng = np.random.default_rng(seed)
    widths, heights = rng.integers(20, 100, num_samples), rng.integers(20, 100, num_samples)
    groups = aspect_ratio_groups(widths, heights)
    assert groups.tolist() == [int(w / h > 1) for w, h in zip(widths.tolist(), heights.tolist(), strict=True)]
    sampler = AspectRatioGroupSampler(groups, batch_size, seed)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert len(pairs) == len(sampler) == sum(mmdet_group_sampler_counts(groups, batch_size).values())
        assert {pair[0] for pair in pairs} == {epoch}
        indices = np.array([index for _, index in pairs])
        assert set(indices.tolist()) == set(range(num_samples))  # every image, plus padding from its own group
        batches = indices.reshape(-1, batch_size)
        assert all(len(set(groups[batch].tolist())) == 1 for batch in batches)
        counts = {int(g): int((groups[indices] == g).sum()) for g in np.unique(groups)}
        assert counts == mmdet_group_sampler_counts(groups, batch_size)
        assert list(sampler) == pairs  # a function of (seed, epoch) only
        orders.append(indices.tolist())
    assert orders[0] != orders[1] or num_samples == 1


def brute_force_flip(pixel_values, masks, height, width):
    flipped, flipped_masks = pixel_values.copy(), masks.copy()
    for y in range(height):
        for x in range(width):
            flipped[:, y, x] = pixel_values[:, y, width - 1 - x]
            flipped_masks[:, y, x] = masks[:, y, width - 1 - x]
    return flipped, flipped_masks


def tight_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


@pytest.mark.parametrize("seed", range(3))
def test_flip_matches_brute_force(seed):
    """Image and masks mirrored inside the image (padding stays at the right and bottom); each box is the tight box
    of its mask before and after the flip."""
    rng = np.random.default_rng(seed)
    height, width, padded_height, padded_width = 13, 21, 32, 32
    pixel_values = rng.standard_normal((3, padded_height, padded_width)).astype(np.float32)
    pixel_values[:, height:], pixel_values[:, :, width:] = 0, 0
    masks = np.zeros((3, padded_height, padded_width), dtype=np.uint8)
    for mask in masks:
        x1, y1 = rng.integers(0, width - 3), rng.integers(0, height - 3)
        mask[y1 : rng.integers(y1 + 1, height + 1), x1 : rng.integers(x1 + 1, width + 1)] = 1
    labels = {
        "class_labels": np.array([0, 1, 2]),
        "boxes": np.array([tight_box(mask) for mask in masks], dtype=np.float32),
        "masks": masks,
    }
    flipped, flipped_labels = flip_horizontally(pixel_values, (height, width), labels)
    expected_pixels, expected_masks = brute_force_flip(pixel_values, masks, height, width)
    np.testing.assert_array_equal(flipped, expected_pixels)
    np.testing.assert_array_equal(flipped_labels["masks"], expected_masks)
    np.testing.assert_array_equal(flipped_labels["boxes"], [tight_box(mask) for mask in expected_masks])
    np.testing.assert_array_equal(flipped_labels["class_labels"], labels["class_labels"])
    np.testing.assert_array_equal(labels["masks"], masks)  # the input is left as it was


def scene(seed: int, height: int, width: int) -> tuple[np.ndarray, dict]:
    """A random RGB image and COCO annotations with polygon masks (one of them crowd, dropped by training)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    annotations = []
    for index in range(4):
        x, y = float(rng.integers(0, width - 8)), float(rng.integers(0, height - 8))
        w, h = float(rng.integers(4, width - x)), float(rng.integers(4, height - y))
        polygon = [x, y, x + w, y, x + w, y + h, x, y + h]
        annotations.append(
            {"bbox": [x, y, w, h], "category_id": index % 3, "area": w * h, "iscrowd": int(index == 3),
             "segmentation": [polygon]}
        )  # fmt: skip
    return image, {"image_id": seed, "annotations": annotations}


def mirrored(image: np.ndarray, annotations: dict) -> tuple[np.ndarray, dict]:
    """The image mirrored and its annotations in the mirrored frame (x -> W - x)."""
    width = image.shape[1]
    objects = []
    for obj in annotations["annotations"]:
        x, y, w, h = obj["bbox"]
        polygon = obj["segmentation"][0]
        mirrored_polygon = [width - value if index % 2 == 0 else value for index, value in enumerate(polygon)]
        objects.append({**obj, "bbox": [width - x - w, y, w, h], "segmentation": [mirrored_polygon]})
    return np.ascontiguousarray(image[:, ::-1]), {**annotations, "annotations": objects}


@pytest.mark.parametrize("return_masks", [False, True])
@pytest.mark.parametrize(("height", "width"), [(40, 70), (64, 33)])
def test_augmentation_is_the_processor_on_the_mirrored_input(return_masks, height, width):
    """Without a flip the sample is the processor's output; with one it is the processor's output for the mirrored
    image and annotations (mmdet flips before normalising and padding; at scale 1 the two orders agree exactly)."""
    image, annotations = scene(height, height, width)
    processor = DenseClipDetectionImageProcessor(size={"shortest_edge": min(height, width), "longest_edge": 1000})
    for probability, (source_image, source_annotations) in (
        (0.0, (image, annotations)),
        (1.0, mirrored(image, annotations)),
    ):
        augmentation = DetectionAugmentation(processor, probability, return_masks=return_masks)
        sample = augmentation(Image.fromarray(image), annotations, np.random.default_rng(0))
        expected = processor(
            images=[Image.fromarray(source_image)], annotations=[source_annotations], return_masks=return_masks
        )
        np.testing.assert_array_equal(sample["pixel_values"], expected["pixel_values"][0])
        np.testing.assert_array_equal(sample["image_size"], expected["image_sizes"][0])
        assert (
            set(sample["labels"])
            == set(expected["labels"][0])
            == {"class_labels", "boxes"} | ({"masks"} if return_masks else set())
        )
        assert len(sample["labels"]["boxes"]) == 3  # the crowd object is no target
        for key, value in expected["labels"][0].items():
            np.testing.assert_allclose(sample["labels"][key], value, atol=1e-4, err_msg=key)


def test_flips_are_drawn_per_sample_with_the_given_probability():
    image, annotations = scene(0, 32, 48)
    processor = DenseClipDetectionImageProcessor(size={"shortest_edge": 32, "longest_edge": 1000})
    augmentation = DetectionAugmentation(processor, 0.5)
    plain = augmentation(Image.fromarray(image), annotations, np.random.default_rng(0))["pixel_values"]
    flips = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        expected = np.random.default_rng(seed).random() < 0.5
        sample = augmentation(Image.fromarray(image), annotations, rng)["pixel_values"]
        assert not np.array_equal(sample, plain) if expected else True
        flips.append(expected)
    assert 10 < sum(flips) < 30


def test_collation_pads_each_image_at_the_bottom_right():
    rng = np.random.default_rng(0)
    sizes = [(32, 64), (64, 32), (32, 32)]
    samples = [
        {
            "pixel_values": rng.standard_normal((3, h, w)).astype(np.float32),
            "image_size": np.array([h - 5, w - 3]),
            "labels": {"class_labels": np.array([index]), "boxes": np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)},
        }
        for index, (h, w) in enumerate(sizes)
    ]
    batch = collate_detection_batch(samples)
    assert batch["pixel_values"].shape == (3, 3, 64, 64)
    for index, (h, w) in enumerate(sizes):
        expected = np.zeros((3, 64, 64), dtype=np.float32)
        expected[:, :h, :w] = samples[index]["pixel_values"]
        np.testing.assert_array_equal(batch["pixel_values"][index].numpy(), expected)
        assert batch["labels"][index]["class_labels"].tolist() == [index]
    assert batch["image_sizes"].tolist() == [[27, 61], [59, 29], [27, 29]]


def test_recipes_are_the_authors():
    """Every row of Tables 3 and 4, with the authors' settings and the paper's AP."""
    paper = {
        ("retinanet", "post_model", "RN50"): (37.8, None), ("retinanet", "none", "RN50"): (36.9, None),
        ("retinanet", "post_model", "RN101"): (41.1, None), ("retinanet", "none", "RN101"): (40.5, None),
        ("maskrcnn", "post_model", "RN50"): (40.2, 37.6), ("maskrcnn", "none", "RN50"): (39.3, 36.8),
        ("maskrcnn", "post_model", "RN101"): (42.6, 39.6), ("maskrcnn", "none", "RN101"): (42.2, 38.9),
    }  # fmt: skip
    rows = {
        (recipe.model_type, recipe.prompting_type, recipe.clip_checkpoint.removesuffix(".pt")): recipe
        for name, recipe in DETECTION_RECIPES.items()
        if name.startswith("coco-")
    }
    assert set(rows) == set(paper)
    for key, recipe in rows.items():
        assert (recipe.paper_box_ap, recipe.paper_mask_ap) == paper[key]
        assert recipe.learning_rate == {"retinanet": 1e-4, "maskrcnn": 2e-4}[key[0]]
        settings = dataclasses.asdict(recipe)
        assert {name: settings[name] for name in (
            "weight_decay", "image_encoder_lr_multiplier", "num_warmup_steps", "warmup_ratio", "lr_milestones",
            "lr_decay", "num_train_epochs", "total_train_batch_size", "image_scale", "flip_probability",
            "max_grad_norm")} == {
            "weight_decay": 1e-4, "image_encoder_lr_multiplier": 0.1, "num_warmup_steps": 500, "warmup_ratio": 0.001,
            "lr_milestones": (8, 11), "lr_decay": 0.1, "num_train_epochs": 12, "total_train_batch_size": 16,
            "image_scale": (1333, 800), "flip_probability": 0.5, "max_grad_norm": 0.1,
        }  # fmt: skip


def test_recipe_settings_become_flags_and_explicit_flags_win(tmp_path):
    args = parse_detection_training_args(
        ["--recipe", "coco-maskrcnn-clip-rn101", "--learning_rate", "3e-4", "--output_dir", str(tmp_path)]
    )
    assert (args.model.model_type, args.model.prompting_type) == ("maskrcnn", "none")
    assert args.optimization.learning_rate == 3e-4 and args.optimization.lr_milestones == [8, 11]
    assert args.augmentation.image_scale == [1333, 800]
    default = parse_detection_training_args(["--output_dir", str(tmp_path)])
    assert default.optimization.recipe == "synthetic" and default.model.model_type == "retinanet"
    # The authors validate every epoch (`evaluation = dict(interval=1)`): `--eval_steps epoch`, the steps of one epoch.
    assert args.optimization.eval_steps == "epoch" and args.optimization.resolve_eval_steps(7330) == 7330
    assert default.optimization.eval_steps is None and default.optimization.resolve_eval_steps(25) is None


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr_milestones", "11", "8"], "--lr_milestones takes increasing epochs"),
        (["--flip_probability", "1.5"], "--flip_probability must be in [0, 1]"),
        (["--image_scale", "256"], "--image_scale takes two positive sizes"),
        (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
        (["--coco_dir", "/does/not/exist"], "is not a folder"),
        (["--model_type", "yolo"], "invalid choice"),
        (["--max_train_steps", "10", "--num_warmup_steps", "10"], "must be smaller than --max_train_steps"),
        (["--eval_steps", "0"], "--eval_steps must be a positive number of steps or 'epoch'"),
        (["--eval_steps", "epochs"], "--eval_steps must be a positive number of steps or 'epoch'"),
    ],
)
def test_bad_arguments_exit_with_a_clear_message(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_detection_training_args([*flags, "--output_dir", str(tmp_path)])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: aspect_ratio_groups(np.array([10, 0]), np.array([5, 5])), "must be positive"),
        (lambda: aspect_ratio_groups(np.array([10, 2]), np.array([5])), "same length"),
        (lambda: AspectRatioGroupSampler(np.array([]), 2, 0), "non-empty vector"),
        (lambda: AspectRatioGroupSampler(np.array([0, 1]), 0, 0), "batch_size must be >= 1"),
        (lambda: DetectionAugmentation(DenseClipDetectionImageProcessor(), 2.0), "flip_probability must be in"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        call()


@pytest.mark.parametrize(("model_type", "mask_threshold"), [("maskrcnn", 0.3), ("maskrcnn", 0.5), ("retinanet", None)])
def test_the_saved_processor_holds_the_models_mask_threshold(tmp_path, model_type, mask_threshold):
    """The processor a run saves is the authors' test pipeline at `--image_scale`, with a Mask R-CNN's
    `config.mask_threshold` as its post-processing default (RetinaNet: the class default, unused)."""
    args = parse_detection_training_args(["--output_dir", str(tmp_path), "--model_type", model_type])
    model_class = DenseClipForInstanceSegmentation if model_type == "maskrcnn" else DenseClipForObjectDetection
    config = tiny_config("maskrcnn" if model_type == "maskrcnn" else "retinanet")
    if mask_threshold is not None:
        config.mask_threshold = mask_threshold
    processor = args.make_task().build_image_processor(model_class(config))
    longest, shortest = args.augmentation.image_scale
    assert processor.size == {"shortest_edge": shortest, "longest_edge": longest}
    assert processor.num_labels == config.num_labels
    assert processor.mask_threshold == (0.5 if mask_threshold is None else mask_threshold)
