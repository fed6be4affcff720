"""Training data: the synthetic scenes, local folder layouts, the authors' augmentation, the epoch sampler."""

import json

import numpy as np
import pytest
from conftest import write_pair
from PIL import Image

from denseclip_hf import DenseClipImageProcessor
from denseclip_hf.synthetic import SYNTHETIC_CLASS_NAMES, load_synthetic_dataset
from denseclip_hf.training.data import (
    ADE20K_CLASS_NAMES,
    EpochShuffleSampler,
    find_image_label_pairs,
    load_segmentation_data,
)
from denseclip_hf.training.transforms import SegmentationAugmentation, photometric_distortion, random_crop

# ---------------------------------------------------------------------------------------------------------------------
# Data sources
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
# Augmentation and sampling
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


def images_in_other_modes(size: int = 32) -> dict[str, Image.Image | np.ndarray]:
    """One seeded picture with transparency or without colour, in the forms a dataset may hold it."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (size, size, 1), dtype=np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    palette = Image.fromarray(rng.integers(0, 4, (size, size), dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 200, 100, 0, 0, 255, 7, 90, 90, 90])
    palette.info["transparency"] = 1
    return {
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], axis=-1), mode="RGBA"),
        "RGBA array": np.concatenate([rgb, alpha], axis=-1),
        "LA": Image.fromarray(np.concatenate([rgb[..., :1], alpha], axis=-1), mode="LA"),
        "P with a transparent colour": palette,
        "L": Image.fromarray(rgb[..., 0]),
        "I;16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + 100),
    }


@pytest.mark.parametrize("mode", list(images_in_other_modes()))
def test_augmentation_trains_on_the_pixels_the_processor_evaluates(mode):
    image = images_in_other_modes()[mode]
    label = Image.fromarray(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32) % 4, mode="P")
    # Every random step off: rescale by 1 to the image's own size, a crop of the whole image, no flip, no distortion.
    augment = SegmentationAugmentation(
        crop_size=32, scale=(32, 32), ratio_range=(1.0, 1.0), cat_max_ratio=1.0, flip_probability=0.0,
        photometric_distortion=False,
    )  # fmt: skip
    pixel_values, labels = augment(image, label, np.random.default_rng(0))
    evaluated = DenseClipImageProcessor(do_resize=False)(images=image, return_tensors="np")["pixel_values"][0]
    # 16-bit data trains rounded to 8 bits (the photometric distortion works on uint8): half a grey level / std.
    tolerance = 0.5 / 255 / min(augment.image_std) if mode == "I;16" else 1e-6
    np.testing.assert_allclose(pixel_values, evaluated, atol=tolerance, rtol=0)
    np.testing.assert_array_equal(labels, np.asarray(label))
    if mode in ("RGBA", "LA", "P with a transparent colour"):  # transparency matters: dropping it trains elsewhere
        dropped = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
        dropped = (dropped - np.array(augment.image_mean)) / np.array(augment.image_std)
        assert np.abs(dropped.transpose(2, 0, 1) - pixel_values).max() > 0.5


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
