"""Training-time augmentation of the DenseCLIP authors' mmseg pipeline, in NumPy and Pillow only.

`Resize(img_scale, ratio_range) -> RandomCrop(crop_size, cat_max_ratio) -> RandomFlip(0.5) -> PhotoMetricDistortion
-> Normalize(CLIP mean/std) -> Pad(crop_size, image 0, label 255)`. Images use bilinear resampling (as
[`DenseClipImageProcessor`] does at test time), label maps nearest; every random draw comes from the
`numpy.random.Generator` passed in, so a sample's augmentation is a function of that generator's seed only.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..configuration_denseclip import IGNORE_INDEX
from ..image_processing_denseclip import DenseClipImageProcessor, image_to_rgb_array, label_map_to_array

_RESIZE_RULE = DenseClipImageProcessor(size_divisor=None)


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv `imrescale`: the largest keep-ratio size with long side <= `max(scale)` and short side <= `min(scale)`,
    sides rounded with `int(side * factor + 0.5)` and at least 1 (the image processor's keep-ratio rule)."""
    size = {"shortest_edge": min(scale), "longest_edge": max(scale)}
    return _RESIZE_RULE.get_resize_output_size(height, width, size, size_divisor=None)


def random_rescale(
    image: np.ndarray,
    label: np.ndarray,
    scale: tuple[int, int],
    ratio_range: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg `Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True)`.

    Draws a ratio r uniformly in `ratio_range` and rescales to `scale * r` keeping the aspect ratio (image bilinear,
    label nearest). `image` `(height, width, 3)` uint8 and `label` `(height, width)` int64.
    """
    ratio = rng.uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    new_height, new_width = rescale_size(*label.shape, target)
    resized = Image.fromarray(image).resize((new_width, new_height), Image.Resampling.BILINEAR)
    return np.asarray(resized), DenseClipImageProcessor.resize_label(label, new_height, new_width)


def random_crop(
    image: np.ndarray,
    label: np.ndarray,
    crop_size: tuple[int, int],
    cat_max_ratio: float,
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
    max_tries: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`: a random window of at most `crop_size` `(height, width)`.

    With `cat_max_ratio < 1`, up to `max_tries` windows are tried until one holds more than one class and its most
    frequent class covers less than `cat_max_ratio` of its labelled (non-ignored) pixels; otherwise the last window
    drawn is used.
    """

    def window() -> tuple[slice, slice]:
        top = int(rng.integers(0, max(label.shape[0] - crop_size[0], 0) + 1))
        left = int(rng.integers(0, max(label.shape[1] - crop_size[1], 0) + 1))
        return slice(top, top + crop_size[0]), slice(left, left + crop_size[1])

    box = window()
    if cat_max_ratio < 1.0:
        for _ in range(max_tries):
            classes, counts = np.unique(label[box], return_counts=True)
            counts = counts[classes != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = window()
    return image[box], label[box]


def _scale_values(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """`clip(values * alpha + beta, 0, 255)` as uint8 (mmseg `PhotoMetricDistortion.convert`)."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness_delta: int = 32,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> np.ndarray:
    """mmseg `PhotoMetricDistortion` on `(height, width, 3)` uint8 RGB, each step applied with probability 0.5.

    Order: brightness, then contrast either first or last (a coin flip), saturation and hue in between. `hue_delta` is
    in OpenCV's half-degree units (18 = 36 degrees), as in mmseg; HSV conversions use Pillow.
    """
    if rng.integers(2):
        image = _scale_values(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_last = rng.integers(2) == 0
    if not contrast_last and rng.integers(2):
        image = _scale_values(image, alpha=rng.uniform(*contrast_range))
    saturate, alpha = rng.integers(2), rng.uniform(*saturation_range)
    shift_hue, shift = rng.integers(2), rng.integers(-hue_delta, hue_delta)
    if saturate or shift_hue:
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        if saturate:
            hsv[..., 1] = _scale_values(hsv[..., 1], alpha=alpha)
        if shift_hue:
            # Pillow's hue spans 0-255 for 360 degrees, OpenCV's 0-180.
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + round(shift * 256 / 180)) % 256
        image = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
    if contrast_last and rng.integers(2):
        image = _scale_values(image, alpha=rng.uniform(*contrast_range))
    return image


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """`(height, width, 3)` uint8 -> `(3, height, width)` float32 `(image / 255 - mean) / std`."""
    scaled = image.astype(np.float32) / 255.0
    return ((scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)


def pad_to(
    pixel_values: np.ndarray, label: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """Pads `(3, h, w)` pixel values with 0 and the `(h, w)` label with `ignore_index` at the bottom and right to
    `size` `(height, width)` (mmseg `Pad(size, pad_val=0, seg_pad_val=255)` after `Normalize`)."""
    pad_height, pad_width = size[0] - label.shape[0], size[1] - label.shape[1]
    pixel_values = np.pad(pixel_values, ((0, 0), (0, pad_height), (0, pad_width)), constant_values=0)
    label = np.pad(label, ((0, pad_height), (0, pad_width)), constant_values=ignore_index)
    return pixel_values, label


@dataclass
class SegmentationAugmentation:
    """The authors' training augmentation with its mmseg defaults (ADE20K ViT-B/16: `scale=(2048, 640)`, crop 640).

    Call it with an image, its label map and a `numpy.random.Generator`; it returns `pixel_values`
    `(3, crop, crop)` float32 and `labels` `(crop, crop)` int64, padded with 0 / `ignore_index` where the rescaled
    image is smaller than the crop. Images and label maps become arrays as in `DenseClipImageProcessor`
    (`image_to_rgb_array`, `label_map_to_array`: grey replicated, alpha composited over white, palette indices as
    class ids), so a model trains on the pixels it is evaluated on; 16-bit and float images are rounded to 8 bits,
    which the photometric distortion works on.
    """

    crop_size: int = 640
    scale: tuple[int, int] = (2048, 640)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_probability: float = 0.5
    photometric_distortion: bool = True
    do_reduce_labels: bool = False
    ignore_index: int = IGNORE_INDEX
    image_mean: tuple[float, ...] = tuple(OPENAI_CLIP_MEAN)
    image_std: tuple[float, ...] = tuple(OPENAI_CLIP_STD)

    def __call__(
        self, image: Image.Image | np.ndarray, label: Image.Image | np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        pixels = image_to_rgb_array(image, as_uint8=True)
        labels = label_map_to_array(label)
        if labels.shape != pixels.shape[:2]:
            raise ValueError(f"A label map of size {labels.shape} belongs to an image of size {pixels.shape[:2]}.")
        if self.do_reduce_labels:
            labels = DenseClipImageProcessor.reduce_label(labels)
        crop = (self.crop_size, self.crop_size)
        pixels, labels = random_rescale(pixels, labels, self.scale, self.ratio_range, rng)
        pixels, labels = random_crop(pixels, labels, crop, self.cat_max_ratio, rng, self.ignore_index)
        if rng.random() < self.flip_probability:
            pixels, labels = pixels[:, ::-1], labels[:, ::-1]
        if self.photometric_distortion:
            pixels = photometric_distortion(np.ascontiguousarray(pixels), rng)
        pixel_values = normalize(pixels, self.image_mean, self.image_std)
        return pad_to(pixel_values, np.ascontiguousarray(labels), crop, self.ignore_index)


__all__ = [
    "SegmentationAugmentation",
    "normalize",
    "pad_to",
    "photometric_distortion",
    "random_crop",
    "random_rescale",
    "rescale_size",
]
