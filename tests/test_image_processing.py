"""Tests of DenseClipImageProcessor against independent NumPy/Pillow computations and hand-computed values."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor
from transformers.modeling_outputs import SemanticSegmenterOutput

import denseclip_hf
from denseclip_hf import DenseClipImageProcessor

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)


def raw_processor(**kwargs) -> DenseClipImageProcessor:
    """No resize, rescale or normalisation: `pixel_values` are the converted RGB values themselves."""
    return DenseClipImageProcessor(do_resize=False, do_rescale=False, do_normalize=False, **kwargs)


def raw_pixels(image, **kwargs) -> np.ndarray:
    """(height, width, 3) float values the processor feeds into resize/rescale."""
    return np.moveaxis(raw_processor()(image, return_tensors="np", **kwargs)["pixel_values"][0], 0, -1)


def reference_resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) -> (height, width, 3) float64 with torch's bilinear, align_corners=False, antialias (as Pillow)."""
    channels_first = torch.from_numpy(np.moveaxis(rgb, -1, 0).astype(np.float64))[None]
    resized = torch.nn.functional.interpolate(
        channels_first, size=(height, width), mode="bilinear", align_corners=False, antialias=True
    )
    return np.moveaxis(resized[0].numpy(), 0, -1)


def reference_normalize(rgb: np.ndarray) -> np.ndarray:
    """(height, width, 3) values in 0-255 -> (3, height, width) CLIP-normalised, in float64."""
    return np.moveaxis((rgb.astype(np.float64) / 255.0 - CLIP_MEAN) / CLIP_STD, -1, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Defaults and sizes
# ---------------------------------------------------------------------------------------------------------------------


def test_defaults_follow_the_authors_test_pipeline():
    processor = DenseClipImageProcessor()
    assert dict(processor.size) == {"shortest_edge": 640, "longest_edge": 2048}
    assert processor.size_divisor == 32 and processor.test_mode == "slide" and processor.scale_ratios is None
    assert processor.resample == Image.Resampling.BILINEAR
    assert processor.do_resize and processor.do_rescale and processor.do_normalize and processor.do_convert_rgb
    assert processor.rescale_factor == pytest.approx(1 / 255)
    np.testing.assert_allclose(processor.image_mean, CLIP_MEAN)
    np.testing.assert_allclose(processor.image_std, CLIP_STD)
    assert processor.do_reduce_labels is False
    assert not hasattr(processor, "post_process_panoptic_segmentation")
    assert not hasattr(processor, "post_process_instance_segmentation")


# (input height, width) -> output (height, width) for one pass over the whole image (`test_mode="whole"`), worked out
# by hand with the mmseg keep-ratio rule scale = min(2048 / long, 640 / short), side = int(side * scale + 0.5), then
# the nearest multiple of 32 (>= 32).
HAND_SIZES = [
    # 640/480 = 1.3333 < 2048/700: 480 -> 640, 700 -> int(933.33 + 0.5) = 933 -> 29.16 * 32 -> 928
    ((480, 700), (640, 928)),
    # ADE20K-like 512 x 683: scale 1.25: 640, int(853.75 + 0.5) = 854 -> 26.69 * 32 -> 27 * 32 = 864
    ((512, 683), (640, 864)),
    # long side binds: 2048/3000 = 0.68267: int(204.8 + 0.5) = 205 -> 6.41 * 32 -> 192; 3000 -> 2048
    ((300, 3000), (192, 2048)),
    # square: 0.64 -> 640 x 640, already multiples of 32
    ((1000, 1000), (640, 640)),
    # very thin: scale 2.048: int(20.48 + 0.5) = 20 -> 0.625 * 32 -> 1 * 32 = 32; 1000 -> 2048
    ((10, 1000), (32, 2048)),
    # thinner still: scale 1.024: 3 -> 3 rounds to 0 multiples, clamped to at least 32
    ((3, 2000), (32, 2048)),
    # portrait: 640/600 = 1.0667: 600 -> 640, int(853.33 + 0.5) = 853 -> 26.66 * 32 -> 27 * 32 = 864
    ((800, 600), (864, 640)),
]


@pytest.mark.parametrize(("input_size", "expected"), HAND_SIZES)
def test_keep_ratio_size_with_size_divisor(input_size, expected):
    assert DenseClipImageProcessor(test_mode="whole").get_resize_output_size(*input_size) == expected


def test_size_variants_computed_by_hand():
    processor = DenseClipImageProcessor(size_divisor=None)
    # no divisor: 480 x 700 -> 640 x int(933.33 + 0.5)
    assert processor.get_resize_output_size(480, 700) == (640, 933)
    # shortest edge only: 2/3 -> 320 x int(466.67 + 0.5) = 467
    assert processor.get_resize_output_size(480, 700, {"shortest_edge": 320}) == (320, 467)
    # longest edge only: 0.5 -> 240 x 350
    assert processor.get_resize_output_size(480, 700, {"longest_edge": 350}) == (240, 350)
    # fixed size
    assert processor.get_resize_output_size(480, 700, {"height": 50, "width": 70}) == (50, 70)
    # the divisor applies to fixed sizes too; halves round up: 48 = 1.5 * 32 -> 64, 80 = 2.5 * 32 -> 96
    assert processor.get_resize_output_size(480, 700, {"height": 48, "width": 80}, 32) == (64, 96)
    # 47 = 1.47 * 32 -> 32, 112 = 3.5 * 32 -> 128
    assert processor.get_resize_output_size(480, 700, {"height": 47, "width": 112}, 32) == (32, 128)
    # an int size means the shortest edge
    assert DenseClipImageProcessor(size=320, size_divisor=None).get_resize_output_size(480, 700) == (320, 467)


def test_every_output_size_fits_the_model():
    processor = DenseClipImageProcessor(test_mode="whole")
    for height in range(1, 3000, 97):
        for width in range(1, 3000, 89):
            out_height, out_width = processor.get_resize_output_size(height, width)
            assert out_height % 32 == 0 and out_width % 32 == 0 and out_height >= 32 and out_width >= 32


def test_pixel_values_and_labels_have_the_hand_computed_size():
    image = Image.fromarray(random_rgb(480, 700))
    labels = Image.fromarray(np.random.RandomState(1).randint(0, 151, (480, 700), dtype=np.uint8))
    out = DenseClipImageProcessor()(image, segmentation_maps=labels, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 640, 928)
    assert out["pixel_values"].dtype == torch.float32
    assert out["labels"].shape == (1, 640, 928)
    assert out["labels"].dtype == torch.int64

    per_call = DenseClipImageProcessor()(image, size_divisor=None, return_tensors="pt")
    assert per_call["pixel_values"].shape == (1, 3, 640, 933)


def test_pipeline_style_call():
    out = DenseClipImageProcessor()(images=[Image.fromarray(random_rgb(100, 150))], return_tensors="pt")
    assert set(out.keys()) == {"pixel_values", "test_mode"}  # the protocol the model then runs
    assert out["test_mode"] == "slide"
    # 640/100 = 6.4 -> 640 x 960 (already multiples of 32)
    assert out["pixel_values"].shape == (1, 3, 640, 960)


# ---------------------------------------------------------------------------------------------------------------------
# Pixel values against brute force
# ---------------------------------------------------------------------------------------------------------------------


def test_resize_rescale_normalize_matches_torch_bilinear_plus_numpy():
    rgb = random_rgb(6, 10)
    # 16 / 6 = 2.667 < 64 / 10: 6 -> 16, 10 -> int(26.67 + 0.5) = 27 -> nearest multiple of 8 = 24
    processor = DenseClipImageProcessor(
        size={"shortest_edge": 16, "longest_edge": 64}, size_divisor=8, test_mode="whole"
    )
    pixel_values = processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 24)
    # one resize straight to the final size (no intermediate rounding), then rescale and normalise
    np.testing.assert_allclose(pixel_values[0], reference_normalize(reference_resize(rgb, 16, 24)), atol=1e-5)


def test_fixed_size_matches_torch_bilinear_plus_numpy():
    rgb = random_rgb(5, 7, seed=3)
    processor = DenseClipImageProcessor(size={"height": 8, "width": 12}, size_divisor=4)
    pixel_values = processor([Image.fromarray(rgb)], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixel_values[0], reference_normalize(reference_resize(rgb, 8, 12)), atol=1e-5)


def test_downscale_matches_antialiased_bilinear():
    rgb = random_rgb(50, 75, seed=12)
    # 16 / 50 = 0.32: 50 -> 16, 75 -> 24
    processor = DenseClipImageProcessor(size={"shortest_edge": 16}, size_divisor=None)
    pixel_values = processor(Image.fromarray(rgb), return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 3, 16, 24)
    np.testing.assert_allclose(pixel_values[0], reference_normalize(reference_resize(rgb, 16, 24)), atol=1e-5)


def test_no_resize_is_exact_normalization():
    rgb = random_rgb(9, 11, seed=4)
    pixel_values = DenseClipImageProcessor(do_resize=False)(rgb, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixel_values[0], reference_normalize(rgb), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Image mode and array conversions
# ---------------------------------------------------------------------------------------------------------------------


def test_grayscale_image_is_replicated():
    grey = np.random.RandomState(5).randint(0, 256, (5, 6), dtype=np.uint8)
    expected = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(raw_pixels(Image.fromarray(grey)), expected)  # mode L
    np.testing.assert_array_equal(raw_pixels(grey), expected)  # 2-D array
    np.testing.assert_array_equal(raw_pixels(grey[..., None]), expected)  # (H, W, 1)
    np.testing.assert_array_equal(raw_pixels(grey[None]), expected)  # (1, H, W)
    np.testing.assert_array_equal(raw_pixels(torch.from_numpy(grey)), expected)


def test_rgba_and_la_are_composited_over_white():
    rgb = random_rgb(5, 6, seed=6)
    alpha = np.random.RandomState(13).randint(0, 256, (5, 6)).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255.0 * (1.0 - a)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    from_pil = raw_pixels(Image.fromarray(rgba, mode="RGBA"))
    np.testing.assert_allclose(from_pil, expected, atol=1.0)
    np.testing.assert_array_equal(from_pil[0, 0], [255, 255, 255])  # fully transparent -> white
    np.testing.assert_array_equal(from_pil[0, 1], rgb[0, 1])  # opaque -> unchanged
    np.testing.assert_allclose(raw_pixels(rgba), expected, atol=1.0)  # (H, W, 4) uint8 array
    np.testing.assert_allclose(raw_pixels(np.moveaxis(rgba, -1, 0)), expected, atol=1.0)  # (4, H, W)

    grey = rgb[..., 0]
    la = Image.fromarray(np.stack([grey, alpha], axis=-1), mode="LA")
    expected_grey = grey * (alpha / 255.0) + 255.0 * (1.0 - alpha / 255.0)
    np.testing.assert_allclose(raw_pixels(la), np.repeat(expected_grey[..., None], 3, axis=-1), atol=1.0)


def test_float_rgba_array_uses_the_rescale_range():
    rgb = np.random.RandomState(14).rand(5, 6, 3).astype(np.float32)
    alpha = np.random.RandomState(15).rand(5, 6, 1).astype(np.float32)
    rgba = np.concatenate([rgb, alpha], axis=-1)
    # do_rescale=False: values (and alpha) are in [0, 1], white is 1
    expected = rgb * alpha + 1.0 * (1 - alpha)
    np.testing.assert_allclose(raw_pixels(rgba), expected, atol=1e-6)
    # do_rescale=True: values in [0, 255], white and opaque are 255
    processor = DenseClipImageProcessor(do_resize=False, do_normalize=False)
    scaled = np.concatenate([rgb * 255, alpha * 255], axis=-1)
    out = np.moveaxis(processor(scaled, return_tensors="np")["pixel_values"][0], 0, -1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_palette_image_uses_palette_colours():
    palette = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 7]], dtype=np.uint8)
    indices = np.array([[0, 1, 2], [2, 2, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    np.testing.assert_array_equal(raw_pixels(image), palette[indices])


def test_palette_image_with_transparency_is_composited():
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60])
    image.info["transparency"] = 0
    np.testing.assert_array_equal(raw_pixels(image), [[[255, 255, 255], [40, 50, 60]]])


def test_sixteen_bit_images_are_scaled_not_clipped():
    values = np.array([[0, 257, 25700], [1000, 65535, 32896]], dtype=np.uint16)
    expected = np.repeat((values / 257.0)[..., None], 3, axis=-1)  # 25700 -> 100, not clipped to 255
    i16 = Image.fromarray(values)
    assert i16.mode == "I;16"
    np.testing.assert_allclose(raw_pixels(i16), expected, rtol=1e-6)
    i32 = Image.fromarray(values.astype(np.int32))
    assert i32.mode == "I"
    np.testing.assert_allclose(raw_pixels(i32), expected, rtol=1e-6)
    np.testing.assert_allclose(raw_pixels(values), expected, rtol=1e-6)  # uint16 array
    rgb16 = np.stack([values, values // 2, values // 3], axis=-1)
    np.testing.assert_allclose(raw_pixels(rgb16), rgb16 / 257.0, rtol=1e-6)


def test_sixteen_bit_png_path_is_not_clipped(tmp_path):
    values = np.array([[0, 25700, 65535], [257, 514, 1028]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    np.testing.assert_allclose(
        raw_pixels(str(tmp_path / "grey16.png")), np.repeat((values / 257.0)[..., None], 3, axis=-1), rtol=1e-6
    )


def test_sixteen_bit_image_matches_its_eight_bit_equivalent():
    grey8 = np.random.RandomState(7).randint(0, 256, (6, 9), dtype=np.uint8)
    grey16 = Image.fromarray(grey8.astype(np.uint16) * 257)
    processor = DenseClipImageProcessor(size={"height": 16, "width": 24}, size_divisor=None)
    out16 = processor(grey16, return_tensors="np")["pixel_values"]
    out8 = processor(Image.fromarray(grey8), return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(out16, out8, atol=1e-5)
    expected = reference_normalize(reference_resize(np.repeat(grey8[..., None], 3, axis=-1), 16, 24))
    np.testing.assert_allclose(out16[0], expected, atol=1e-5)


def test_arrays_and_tensors_match_pil():
    rgb = random_rgb(7, 5, seed=8)
    expected = raw_pixels(Image.fromarray(rgb))
    np.testing.assert_array_equal(expected, rgb)
    np.testing.assert_array_equal(raw_pixels(rgb), rgb)
    np.testing.assert_array_equal(raw_pixels(np.moveaxis(rgb, -1, 0)), rgb)
    np.testing.assert_array_equal(raw_pixels(torch.from_numpy(np.moveaxis(rgb, -1, 0).copy())), rgb)
    np.testing.assert_array_equal(raw_pixels(rgb.astype(np.float32)), rgb)
    np.testing.assert_array_equal(raw_pixels(torch.from_numpy(rgb.astype(np.int64))), rgb)
    batch = raw_processor()(np.stack([rgb, rgb[::-1]]), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(np.moveaxis(batch[1], 0, -1), rgb[::-1])


def test_images_keep_their_channels_without_conversion():
    """With `do_convert_rgb=False` an image keeps its channels (transformers' processors do); normalising them needs
    one mean and std per channel."""
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5)
    kept = raw_processor(do_convert_rgb=False)(Image.fromarray(grey), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(kept, grey[None, None].astype(np.float32))
    rgba = np.random.default_rng(0).integers(0, 256, (6, 5, 4), dtype=np.uint8)
    out = DenseClipImageProcessor(do_resize=False, do_convert_rgb=False, image_mean=[0.5] * 4, image_std=[0.25] * 4)(
        rgba, return_tensors="np"
    )["pixel_values"]
    np.testing.assert_allclose(out[0], (rgba.transpose(2, 0, 1) / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"has 4 channels but image_mean / image_std have 3 / 3 values"):
        DenseClipImageProcessor(do_convert_rgb=False)(rgba)


def test_image_conversion_errors():
    with pytest.raises(ValueError, match=r"outside the 8-bit range \[0, 255\]: cast 16-bit images to uint16"):
        raw_pixels(np.full((4, 4, 3), 1000, dtype=np.int32))
    with pytest.raises(ValueError, match=r"'I' images are read as 16-bit data"):
        raw_pixels(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)))
    with pytest.raises(ValueError, match=r"'F' mode\) PIL images have no defined value range"):
        raw_pixels(Image.fromarray(np.zeros((4, 4), dtype=np.float32)))
    with pytest.raises(ValueError, match=r"Cannot tell the channel axis of an image array of shape \(5, 6, 7\)"):
        raw_pixels(np.zeros((5, 6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"has 2 channels: expected 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\)"):
        raw_pixels(np.zeros((6, 7, 2), dtype=np.uint8), input_data_format="channels_last")
    with pytest.raises(ValueError, match=r"An image array has shape \(1, 2, 6, 7, 3\): expected \(height, width\)"):
        raw_pixels([np.zeros((1, 2, 6, 7, 3), dtype=np.uint8)])


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation maps
# ---------------------------------------------------------------------------------------------------------------------


def labels_of(label_map, image_size: tuple[int, int], **kwargs) -> np.ndarray:
    image = np.zeros((*image_size, 3), dtype=np.uint8)
    out = DenseClipImageProcessor(**kwargs)(image, segmentation_maps=label_map, return_tensors="np")
    assert out["labels"].dtype == np.int64
    return out["labels"][0]


def test_nearest_upscale_by_hand():
    label = np.array([[1, 2], [3, 4]], dtype=np.uint8)
    expected = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    out = labels_of(Image.fromarray(label), (2, 2), size={"height": 4, "width": 4}, size_divisor=None)
    np.testing.assert_array_equal(out, expected)


def test_nearest_downscale_by_hand():
    label = np.arange(36, dtype=np.int64).reshape(6, 6)
    # output pixel i samples input pixel floor((i + 0.5) * 2) = 1, 3, 5
    expected = [[7, 9, 11], [19, 21, 23], [31, 33, 35]]
    out = labels_of(label, (6, 6), size={"height": 3, "width": 3}, size_divisor=None)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("out_size", [(5, 3), (23, 17), (11, 7), (4, 9), (64, 96), (13, 13)])
def test_nearest_resize_matches_pillow(out_size):
    label = np.random.RandomState(9).randint(0, 70000, (11, 7)).astype(np.int32)  # labels above 255 too
    expected = np.asarray(Image.fromarray(label).resize(out_size[::-1], Image.Resampling.NEAREST))
    out = labels_of(label, (11, 7), size={"height": out_size[0], "width": out_size[1]}, size_divisor=None)
    np.testing.assert_array_equal(out, expected)


def test_labels_follow_pixel_values_and_are_never_normalized():
    label = np.random.RandomState(10).randint(0, 151, (30, 45), dtype=np.uint8)
    out = DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 512})(
        Image.fromarray(random_rgb(30, 45)), segmentation_maps=Image.fromarray(label), return_tensors="pt"
    )
    # 64 / 30 = 2.1333: 30 -> 64, 45 -> int(96 + 0.5) = 96
    assert out["pixel_values"].shape[-2:] == out["labels"].shape[-2:] == (64, 96)
    expected = np.asarray(Image.fromarray(label).resize((96, 64), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(out["labels"][0].numpy(), expected)


def test_reduce_labels_by_hand():
    label = np.array([[0, 1, 2], [150, 255, 0], [300, 254, 7]], dtype=np.int64)
    expected = [[255, 0, 1], [149, 255, 255], [299, 253, 6]]
    kwargs = {"do_resize": False}
    np.testing.assert_array_equal(labels_of(label, (3, 3), do_reduce_labels=True, **kwargs), expected)
    np.testing.assert_array_equal(labels_of(label, (3, 3), **kwargs), label)  # default: unchanged
    # reduce first, then nearest resize (2x): each reduced value repeated
    resized = labels_of(label, (3, 3), do_reduce_labels=True, size={"height": 6, "width": 6}, size_divisor=None)
    np.testing.assert_array_equal(resized, np.repeat(np.repeat(expected, 2, axis=0), 2, axis=1))


def test_palette_label_map_uses_indices():
    indices = np.array([[0, 5, 17], [17, 150, 0]], dtype=np.uint8)
    label_map = Image.fromarray(indices, mode="P")
    label_map.putpalette(np.random.RandomState(11).randint(0, 256, 768).tolist())
    np.testing.assert_array_equal(labels_of(label_map, (2, 3), do_resize=False), indices)


def test_integer_label_maps_keep_their_values():
    values = np.array([[0, 255, 256], [300, 1000, 65535]], dtype=np.uint16)
    l_map = Image.fromarray(np.array([[0, 255, 7], [1, 2, 3]], dtype=np.uint8))
    np.testing.assert_array_equal(labels_of(l_map, (2, 3), do_resize=False), [[0, 255, 7], [1, 2, 3]])
    i16 = Image.fromarray(values)
    assert i16.mode == "I;16"
    np.testing.assert_array_equal(labels_of(i16, (2, 3), do_resize=False), values)
    i32 = Image.fromarray(values.astype(np.int32) + 10)
    assert i32.mode == "I"
    np.testing.assert_array_equal(labels_of(i32, (2, 3), do_resize=False), values.astype(np.int64) + 10)
    np.testing.assert_array_equal(labels_of(values.astype(np.int64), (2, 3), do_resize=False), values)
    np.testing.assert_array_equal(
        labels_of(torch.from_numpy(values.astype(np.int64)), (2, 3), do_resize=False), values
    )
    np.testing.assert_array_equal(labels_of(values[None].astype(np.int32), (2, 3), do_resize=False), values)
    np.testing.assert_array_equal(labels_of(values[..., None].astype(np.int32), (2, 3), do_resize=False), values)
    np.testing.assert_array_equal(labels_of(values.astype(np.float32), (2, 3), do_resize=False), values)


def test_batch_of_label_maps():
    maps = np.stack([np.full((5, 7), 3), np.full((5, 7), 9)])
    images = [np.zeros((5, 7, 3), dtype=np.uint8)] * 2
    out = DenseClipImageProcessor(do_resize=False)(images, segmentation_maps=maps, return_tensors="pt")
    assert out["labels"].shape == (2, 5, 7)
    assert out["labels"][0].unique().tolist() == [3] and out["labels"][1].unique().tolist() == [9]
    listed = DenseClipImageProcessor(do_resize=False)(images, segmentation_maps=list(maps), return_tensors="pt")
    assert torch.equal(listed["labels"], out["labels"])


def test_label_map_errors():
    image = np.zeros((5, 6, 3), dtype=np.uint8)
    processor = DenseClipImageProcessor()
    rgb_map = Image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"Segmentation map 0 is a 3-channel \(RGB\) image: label maps must hold one"):
        processor(image, segmentation_maps=rgb_map)
    with pytest.raises(ValueError, match=r"3-channel \(RGB/RGBA\) map: .*Convert colour-coded maps to class ids"):
        processor(image, segmentation_maps=np.zeros((5, 6, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"3-channel \(RGB/RGBA\) map"):
        processor([image, image], segmentation_maps=[np.zeros((5, 6)), np.zeros((3, 5, 6))])
    with pytest.raises(ValueError, match=r"has size \(5, 7\) \(height, width\) but its image has size \(5, 6\).*"):
        processor(image, segmentation_maps=np.zeros((5, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"nearest-neighbour interpolation"):
        processor(image, segmentation_maps=Image.fromarray(np.zeros((6, 5), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"Got 1 segmentation maps for 2 images: pass exactly one label map per"):
        processor([image, image], segmentation_maps=[np.zeros((5, 6), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"Got 3 segmentation maps for 2 images"):
        processor([image, image], segmentation_maps=[np.zeros((5, 6), dtype=np.uint8)] * 3)
    with pytest.raises(ValueError, match=r"has shape \(24,\): expected a 2-D \(height, width\) array of class ids"):
        processor(image, segmentation_maps=[np.zeros(24, dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"has shape \(2, 5, 6\): expected a 2-D \(height, width\) array"):
        processor(image, segmentation_maps=[np.zeros((2, 5, 6), dtype=np.uint8)])
    with pytest.raises(TypeError, match=r"Segmentation map 0 has unsupported type str: pass a PIL image, a"):
        processor(image, segmentation_maps="labels.png")
    with pytest.raises(ValueError, match=r"holds non-integer values"):
        processor(image, segmentation_maps=np.full((5, 6), 0.5))


# ---------------------------------------------------------------------------------------------------------------------
# Other errors
# ---------------------------------------------------------------------------------------------------------------------


def test_setting_errors():
    image = random_rgb(5, 6)
    with pytest.raises(ValueError, match=r"Unsupported size .*max_height.* use \{\"shortest_edge\""):
        DenseClipImageProcessor(size={"max_height": 64, "max_width": 64})(image)
    with pytest.raises(ValueError, match=r"size_divisor must be a positive int or None, got 0"):
        DenseClipImageProcessor()(image, size_divisor=0)
    with pytest.raises(ValueError, match=r"does not center-crop or pad"):
        DenseClipImageProcessor()(image, do_pad=True, pad_size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match=r"only returns channels-first arrays"):
        DenseClipImageProcessor()(image, data_format="channels_last")
    with pytest.raises(ValueError, match=r"different sizes \[\(640, 640\), \(640, 960\)\].*process them one at a"):
        DenseClipImageProcessor()([random_rgb(10, 10), random_rgb(10, 15)], return_tensors="pt")
    # without tensors, differently sized images come back as a list
    out = DenseClipImageProcessor()([random_rgb(10, 10), random_rgb(10, 15)])
    assert [array.shape for array in out["pixel_values"]] == [(3, 640, 640), (3, 640, 960)]


# ---------------------------------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------------------------------


def upsample_2x_weights() -> np.ndarray:
    """(4, 2) bilinear weights of a 2 -> 4 resize with align_corners=False, written out by hand.

    Output centres map to input coordinates (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    """
    return np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def test_post_process_without_and_with_target_sizes():
    logits = torch.tensor(
        [
            [[0.0, 5.0], [1.0, 0.0]],  # class 0
            [[1.0, 0.0], [3.0, 4.0]],  # class 1
            [[2.0, 0.0], [0.0, 2.0]],  # class 2
        ]
    )[None]
    processor = DenseClipImageProcessor()
    (plain,) = processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits))
    assert plain.dtype == torch.int64
    assert plain.tolist() == [[2, 0], [1, 1]]

    weights = upsample_2x_weights()
    upsampled = np.einsum("ia,cab,jb->cij", weights, logits[0].double().numpy(), weights)
    expected = upsampled.argmax(axis=0)
    (resized,) = processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits), [(4, 4)])
    assert resized.shape == (4, 4) and resized.dtype == torch.int64
    np.testing.assert_array_equal(resized.numpy(), expected)
    # the interpolation matters: nearest upsampling of the 2x2 argmax would differ here
    assert not np.array_equal(expected, np.repeat(np.repeat(plain.numpy(), 2, 0), 2, 1))


def test_post_process_batch_and_tensor_target_sizes():
    logits = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    outputs = SemanticSegmenterOutput(logits=logits)
    maps = DenseClipImageProcessor().post_process_semantic_segmentation(outputs, torch.tensor([[6, 10], [3, 5]]))
    assert [tuple(m.shape) for m in maps] == [(6, 10), (3, 5)]
    assert all(m.dtype == torch.int64 for m in maps)
    # same size as the logits: plain argmax
    assert torch.equal(maps[1], logits[1].argmax(0))
    with pytest.raises(ValueError, match=r"Got 1 target sizes for a batch of 2 logits"):
        DenseClipImageProcessor().post_process_semantic_segmentation(outputs, [(6, 10)])


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading, auto classes, remote code
# ---------------------------------------------------------------------------------------------------------------------


CUSTOM_SETTINGS = {
    "size": {"height": 96, "width": 128},
    "size_divisor": None,
    "resample": Image.Resampling.NEAREST,
    "do_rescale": False,
    "rescale_factor": 0.5,
    "do_normalize": False,
    "image_mean": (0.1, 0.2, 0.3),
    "image_std": (0.4, 0.5, 0.6),
    "do_reduce_labels": True,
    "do_convert_rgb": False,
    "test_mode": "whole",
    "scale_ratios": [0.5, 1.0],
}


def test_save_and_load_round_trip(tmp_path):
    processor = DenseClipImageProcessor(**CUSTOM_SETTINGS)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size_divisor"] is None and saved["image_processor_type"] == "DenseClipImageProcessor"

    for loaded in (DenseClipImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is DenseClipImageProcessor
        assert loaded.to_dict() == processor.to_dict()
        for key, value in CUSTOM_SETTINGS.items():
            loaded_value = getattr(loaded, key)
            assert (dict(loaded_value) if key == "size" else loaded_value) == value, key

    default = DenseClipImageProcessor()
    default.save_pretrained(tmp_path / "default")
    reloaded = AutoImageProcessor.from_pretrained(tmp_path / "default")
    assert reloaded.to_dict() == default.to_dict()
    image = random_rgb(20, 30)
    np.testing.assert_array_equal(
        reloaded(image, return_tensors="np")["pixel_values"], default(image, return_tensors="np")["pixel_values"]
    )


def test_auto_image_processor_is_registered_for_the_config():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    assert IMAGE_PROCESSOR_MAPPING[denseclip_hf.DenseClipConfig]["pil"] is DenseClipImageProcessor
