"""Image processor for DenseCLIP semantic segmentation (Rao et al., CVPR 2022).

Reproduces the authors' mmseg test pipeline of the ViT-B/16 ADE20K model (keep-ratio resize to `img_scale=(2048, 640)`,
bilinear, OpenAI CLIP normalisation) on top of transformers' Pillow/NumPy backend, so it needs only Pillow, NumPy and
PyTorch (no torchvision).

Its image and label-map conversions (`image_to_rgb_array`, `label_map_to_array`, `to_numpy`) are the package's one
way of turning images into arrays: training augmentation, pictures and the detection processor use them too.

It imports only its sibling `configuration_denseclip` (a flat relative import), so it is also shipped next to saved
checkpoints and loaded with `trust_remote_code=True` where the package is not installed.
"""

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ChannelDimension,
    ImageInput,
    PILImageResampling,
    SizeDict,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

from .configuration_denseclip import IGNORE_INDEX, TEST_MODES

logger = logging.get_logger(__name__)

# The authors' multi-scale test: these ratios of `size` (their `img_ratios`), each with a horizontal flip.
MULTI_SCALE_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# Sentinel: "use this processor's own setting" (`None` is a real `size_divisor` value that disables rounding).
_FROM_SETTINGS: Any = object()

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_SUPPORTED_SIZES = (
    '{"shortest_edge": s, "longest_edge": l}, {"shortest_edge": s}, {"longest_edge": l} or {"height": h, "width": w}'
)


class DenseClipImageProcessorKwargs(ImagesKwargs, total=False):
    """DenseCLIP-specific keyword arguments on top of transformers' `ImagesKwargs`.

    size_divisor (`int` or `None`):
        Round each resized side to the nearest multiple of this value (at least the value itself) for a single pass
        over the whole image (`test_mode="whole"`, or with label maps); `None` disables.
    do_reduce_labels (`bool`):
        Map label 0 to 255 (ignored) and every other label `x` (except 255) to `x - 1`, for ADE20K-style maps.
    test_mode (`str`):
        The model's test protocol the images are prepared for: `"slide"` (sliding windows) or `"whole"`.
    scale_ratios (`list[float]` or `None`):
        Prepare a multi-scale test: one keep-ratio resize of each image per ratio of `size`.
    """

    size_divisor: int | None
    do_reduce_labels: bool | None
    test_mode: str | None
    scale_ratios: list[float] | tuple[float, ...] | None


def scaled_size(size: SizeDict, ratio: float) -> SizeDict:
    """`size` times `ratio`, each bound truncated to an int: mmseg's `MultiScaleFlipAug` scales
    `img_scale=(2048, 640)` by `img_ratios` this way (0.75 -> (1536, 480))."""
    bounds = ("height", "width", "shortest_edge", "longest_edge")
    return SizeDict(**{name: int(getattr(size, name) * ratio) for name in bounds if getattr(size, name)})


def _round_to_multiple(length: int, divisor: int) -> int:
    """Nearest multiple of `divisor` to `length` (halves round up), at least `divisor`."""
    return max(divisor, (2 * length + divisor) // (2 * divisor) * divisor)


def _channel_axis(array: np.ndarray, input_data_format: ChannelDimension | str | None) -> int:
    """Channel axis (0 or 2) of a 3-D image array; channels first when both ends could be channels (as transformers).

    Pass `input_data_format` for tiny images where this is ambiguous (e.g. `(3, 5, 4)`).
    """
    if input_data_format is not None:
        return 0 if ChannelDimension(input_data_format) == ChannelDimension.FIRST else 2
    if array.shape[0] in (1, 3, 4):
        if array.shape[-1] in (1, 3, 4):
            logger.warning(
                f"Ambiguous channel axis for an image array of shape {array.shape}: assuming channels first. Pass "
                "input_data_format='channels_last' if the channels are last."
            )
        return 0
    if array.shape[-1] in (1, 3, 4):
        return 2
    raise ValueError(
        f"Cannot tell the channel axis of an image array of shape {array.shape}: expected 1, 3 or 4 channels first "
        "(channels, height, width) or last (height, width, channels). Pass `input_data_format` if it is one of those."
    )


def to_numpy(array: Any, name: str = "array") -> np.ndarray:
    """A NumPy array from a NumPy array or a torch tensor (any device; float16 / bfloat16 become float32); anything
    else is a `TypeError` that names `name`."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype in (torch.float16, torch.bfloat16):
            array = array.float()
        return array.numpy()
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array or a torch tensor, got {type(array).__name__}.")
    return array


def _array_to_eight_bit_range(array: np.ndarray) -> np.ndarray:
    """Brings image values to the 8-bit range: uint8 kept, uint16 divided by 257 (float32), floats kept (float32).

    Other integer dtypes must already hold 8-bit values (0-255); bool becomes 0/255.
    """
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array.astype(np.float32) / 257.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(
                f"An image array of dtype {array.dtype} has values in [{array.min()}, {array.max()}], outside the "
                "8-bit range [0, 255]: cast 16-bit images to uint16 (they are then scaled to 0-255), or to uint8."
            )
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32, copy=False)
    raise ValueError(f"Unsupported image array dtype {array.dtype}: use uint8, uint16 or a float dtype.")


def _composite_on_white(rgba: np.ndarray, full_scale: float) -> np.ndarray:
    """(height, width, 4) colour + alpha -> (height, width, 3) over a white background; `full_scale` = opaque/white."""
    alpha = rgba[..., 3:].astype(np.float32) / full_scale
    colour = rgba[..., :3].astype(np.float32)
    blended = colour * alpha + full_scale * (1.0 - alpha)
    if rgba.dtype == np.uint8:
        return np.clip(np.round(blended), 0, 255).astype(np.uint8)
    return blended.astype(np.float32)


def _pil_image_to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image of any common mode -> (height, width, 3) array in the 8-bit range (uint8, or float32 for 16 bits)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"A 32-bit integer ('I' mode) image has values in [{values.min()}, {values.max()}]: 'I' images are "
                "read as 16-bit data (0-65535, how Pillow opens 16-bit PNGs). Convert it to 'I;16' or 'L' first."
            )
        grey = (values.astype(np.float32) / 257.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError(
            "32-bit float ('F' mode) PIL images have no defined value range: pass a float NumPy array instead "
            "(values in 0-255 with do_rescale=True, or in 0-1 with do_rescale=False)."
        )
    if "A" in image.getbands() or "transparency" in image.info:
        # The same compositing as for a 4-channel array, so that an image gives the same pixels in either form.
        return _composite_on_white(np.asarray(image.convert("RGBA")), 255.0)
    return np.asarray(image.convert("RGB"))


def _array_image_to_rgb(
    array: np.ndarray, input_data_format: ChannelDimension | str | None, full_scale: float, do_convert_rgb: bool
) -> np.ndarray:
    """Image array (height, width), (height, width, C) or (C, height, width), C in {1, 3, 4} -> (height, width, 3)."""
    if array.ndim == 2:
        array = array[..., None]
    elif array.ndim == 3:
        array = np.moveaxis(array, _channel_axis(array, input_data_format), -1)
    else:
        raise ValueError(
            f"An image array has shape {array.shape}: expected (height, width), (height, width, channels) or "
            "(channels, height, width); pass a batch as a list of images or a 4-D (batch, ...) array."
        )
    is_float = np.issubdtype(array.dtype, np.floating)
    array = _array_to_eight_bit_range(array)
    channels = array.shape[-1]
    if channels == 3 or not do_convert_rgb:
        return array
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 4:
        # Integer data is now in the 8-bit range (opaque = 255); float data keeps the caller's range.
        return _composite_on_white(array, full_scale if is_float else 255.0)
    raise ValueError(f"An image array has {channels} channels: expected 1 (grey), 3 (RGB) or 4 (RGBA).")


def image_to_rgb_array(
    image: Image.Image | np.ndarray | torch.Tensor,
    input_data_format: ChannelDimension | str | None = None,
    full_scale: float = 255.0,
    as_uint8: bool = False,
) -> np.ndarray:
    """One image -> its RGB pixels `(height, width, 3)` in the 8-bit value range, the conversion of
    `DenseClipImageProcessor(do_convert_rgb=True)`: grey is replicated, alpha composited over white
    (`colour * a + white * (1 - a)`), palette images take their colours, 16-bit data is divided by 257.

    Args:
        image: A PIL image of any common mode, or a NumPy array / torch tensor `(height, width)`, `(height, width,
            C)` or `(C, height, width)` with C in 1, 3, 4 (uint8, uint16 or float).
        input_data_format: The channel axis of an array, where its shape leaves it ambiguous.
        full_scale: The opaque alpha value (and white) of float arrays: 255 for 0-255 data, 1 for 0-1 data.
        as_uint8: Round 16-bit and float results to uint8 (for code that works on 8-bit images: the training
            augmentation, pictures); 8-bit images are returned unchanged either way.

    Returns:
        `(height, width, 3)` uint8 for 8-bit images (and with `as_uint8`), else float32 in 0-255.
    """
    if isinstance(image, Image.Image):
        rgb = _pil_image_to_rgb(image)
    else:
        rgb = _array_image_to_rgb(to_numpy(image, "image"), input_data_format, full_scale, do_convert_rgb=True)
    if as_uint8 and rgb.dtype != np.uint8:
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return rgb


def _image_to_channels_first(
    image: Any, do_convert_rgb: bool, input_data_format: ChannelDimension | str | None, full_scale: float
) -> np.ndarray:
    """One PIL image, NumPy array or torch tensor -> `(3, height, width)` array in the 8-bit value range (uint8, or
    float32 for 16-bit/float data; `image_to_rgb_array`); `full_scale` is the opaque alpha value of float arrays. With
    `do_convert_rgb=False` the image keeps its channels, `(channels, height, width)`, as transformers' processors
    keep them (normalise with as many means and stds)."""
    if do_convert_rgb:
        rgb = image_to_rgb_array(image, input_data_format, full_scale)
    elif isinstance(image, Image.Image):
        rgb = np.asarray(image)
        if rgb.ndim == 2:
            rgb = rgb[..., None]
    else:
        rgb = _array_image_to_rgb(to_numpy(image, "image"), input_data_format, full_scale, do_convert_rgb=False)
    return np.ascontiguousarray(np.moveaxis(rgb, -1, 0))


def _fetch_images_keeping_mode(image_url_or_urls: Any, fetch_remote: Callable[[Any], Any]) -> Any:
    """Open local image paths (nested lists too) keeping their mode, EXIF orientation applied; anything else goes
    to `fetch_remote` (transformers' `fetch_images`: URLs, and images passed through)."""
    if isinstance(image_url_or_urls, (list, tuple)):
        return [_fetch_images_keeping_mode(item, fetch_remote) for item in image_url_or_urls]
    if isinstance(image_url_or_urls, str) and os.path.isfile(image_url_or_urls):
        with Image.open(image_url_or_urls) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    return fetch_remote(image_url_or_urls)


def _size_rule(height: int, width: int, size: SizeDict) -> tuple[int, int]:
    """Output `(height, width)` of the `size` setting for an input of `(height, width)` (may be 0 for extreme aspect
    ratios): a fixed `height`/`width`, or mmcv's keep-ratio rule `scale = min(shortest_edge / short side,
    longest_edge / long side)` (either bound alone too), each side `int(side * scale + 0.5)` in float64."""
    if size.height and size.width:
        return size.height, size.width
    if size.shortest_edge or size.longest_edge:
        scales = []
        if size.shortest_edge:
            scales.append(size.shortest_edge / min(height, width))
        if size.longest_edge:
            scales.append(size.longest_edge / max(height, width))
        scale = min(scales)
        return int(height * scale + 0.5), int(width * scale + 0.5)
    raise ValueError(f"Unsupported size {dict(size)}: use {_SUPPORTED_SIZES}.")


def label_map_to_array(label_map: Image.Image | np.ndarray | torch.Tensor, name: str = "The label map") -> np.ndarray:
    """A label map -> `(height, width)` int64 class ids, the one conversion of the processor, the training data and
    the pictures.

    Palette ('P') images give their palette indices; 'L', 'I;16' and 'I' images keep their integer values. Arrays and
    tensors are `(height, width)`, `(1, height, width)` or `(height, width, 1)`, of integers (floats only if they hold
    whole numbers). Anything else is a `ValueError` / `TypeError` whose message starts with `name`.
    """
    rgb_hint = (
        "label maps must hold one class id per pixel. Convert colour-coded maps to class ids first (look each colour "
        "up in the dataset's palette), or save them as palette ('P') or single-channel ('L', 'I;16') PNGs."
    )
    if isinstance(label_map, Image.Image):
        bands = label_map.getbands()
        if len(bands) > 1:
            raise ValueError(f"{name} is a {len(bands)}-channel ({label_map.mode}) image: {rgb_hint}")
        array = np.asarray(label_map)
    elif not isinstance(label_map, (np.ndarray, torch.Tensor)):
        raise TypeError(
            f"{name} has unsupported type {type(label_map).__name__}: pass a PIL image, a NumPy array or a torch "
            "tensor (open label files with PIL.Image.open)."
        )
    else:
        array = to_numpy(label_map, name)
        if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
            array = array.squeeze(0) if array.shape[0] == 1 else array.squeeze(-1)
        elif array.ndim == 3 and (array.shape[0] in (3, 4) or array.shape[-1] in (3, 4)):
            channels = array.shape[-1] if array.shape[-1] in (3, 4) else array.shape[0]
            raise ValueError(f"{name} has shape {array.shape}, a {channels}-channel (RGB/RGBA) map: {rgb_hint}")
        if array.ndim != 2:
            raise ValueError(
                f"{name} has shape {array.shape}: expected a 2-D (height, width) array of class ids ((1, height, "
                "width) and (height, width, 1) are accepted too), one map per image."
            )
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"{name} holds non-integer values: label maps must contain integer class ids (not scores: take "
                "the argmax of logits, or post_process_semantic_segmentation's maps)."
            )
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name} has unsupported dtype {array.dtype}: use an integer dtype.")
    return array.astype(np.int64)


def _flatten_images(images: Any) -> list[Any]:
    """A single image, a list (possibly nested) of images or a 4-D batch array -> flat list of images."""
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    return _flatten_images_item(images)


def _flatten_images_item(image: Any) -> list[Any]:
    if isinstance(image, Image.Image):
        return [image]
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return list(image) if image.ndim == 4 else [image]
    raise ValueError(
        f"Unsupported image type {type(image).__name__}: pass PIL images, NumPy arrays, torch tensors, URLs or paths."
    )


def _flatten_segmentation_maps(segmentation_maps: Any, num_images: int) -> list[Any]:
    """A single map, a list (possibly nested) of maps or an (N, height, width) array -> flat list of maps."""
    if isinstance(segmentation_maps, (list, tuple)):
        flat = []
        for item in segmentation_maps:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        return flat
    if isinstance(segmentation_maps, (np.ndarray, torch.Tensor)) and segmentation_maps.ndim >= 3:
        # A batch (N, height, width), except a single image's map given with a channel axis (height, width, 1/3).
        if num_images == 1 and segmentation_maps.ndim == 3 and segmentation_maps.shape[0] != 1:
            return [segmentation_maps]
        return list(segmentation_maps)
    return [segmentation_maps]


class DenseClipImageProcessor(PilBackend):
    r"""Image processor for [`DenseClipForSemanticSegmentation`] (Pillow + NumPy backend, no torchvision).

    Turns images into `pixel_values` `(batch, 3, height, width)` float32 and, optionally, label maps into `labels`
    `(batch, height, width)` int64 of exactly the same height and width. For images without label maps the output
    also holds `test_mode`, the protocol `DenseClipForSemanticSegmentation.forward` then runs (`model(**inputs)`, the
    `image-segmentation` pipeline); with label maps it does not, and the model makes its single pass with the loss.

    The defaults reproduce the DenseCLIP authors' test pipeline for the ViT-B/16 ADE20K model (mmseg
    `Resize(img_scale=(2048, 640), keep_ratio=True)`, `Normalize` with CLIP's mean/std) for their sliding-window test;
    for a single pass over the whole image (`test_mode="whole"`, or label maps for the loss) `size_divisor` makes
    every output fit the model (patch 16, pyramid stride 32). With `scale_ratios` one call prepares the inputs of the
    authors' multi-scale test (`MULTI_SCALE_RATIOS`).

    Settings (each can be given to the constructor or overridden per call):
        do_convert_rgb (`bool`, defaults to `True`):
            Convert every image to 3-channel RGB: grey (`L`, `I;16`, `I`, 1-channel arrays) is replicated, alpha
            (`LA`, `RGBA`, `PA`, transparent palettes, 4-channel arrays) is composited over white, palette (`P`)
            images take their palette colours; 16-bit data is divided by 257 (0-65535 -> 0-255, not clipped)
            (`image_to_rgb_array`). With `False` images keep their channels, as in transformers' processors (give one
            `image_mean` / `image_std` per channel, or one for all).
        do_resize (`bool`, defaults to `True`):
            Resize images (and label maps) per `size` and `size_divisor`.
        size (`dict[str, int]`, defaults to `{"shortest_edge": 640, "longest_edge": 2048}`):
            `{"shortest_edge": s, "longest_edge": l}`: keep the aspect ratio with scale
            `min(l / long side, s / short side)` (mmseg `img_scale=(l, s)`, `keep_ratio=True`), sides rounded with
            `int(side * scale + 0.5)`; `{"shortest_edge": s}` or `{"longest_edge": l}`: the one bound;
            `{"height": h, "width": w}`: fixed size. An int means `{"shortest_edge": int}`.
        size_divisor (`int` or `None`, defaults to `32`):
            After the size rule, round each side to the nearest multiple of `size_divisor` (halves up, at least
            `size_divisor`), in the same single resize, where the model makes one pass over the whole image: with
            `test_mode="whole"`, and whenever `segmentation_maps` are given (the loss uses that pass). `None`
            disables it. Not applied under `test_mode="slide"` without label maps (the authors' windows have the
            crop size, so they resize without rounding), nor when `do_resize=False`.
        test_mode (`str`, defaults to `"slide"`):
            The model's test protocol (`DenseClipConfig.test_mode`) the images are prepared for, and which the output
            asks the model to run (images without label maps): `"slide"` resizes exactly as the authors do,
            `"whole"` also applies `size_divisor`.
        scale_ratios (`list[float]`, *optional*):
            Prepare a multi-scale test: each image is resized (keep ratio) once per ratio, to `size` times the ratio
            (each bound truncated to an int, as mmseg's `img_ratios`; the authors: `MULTI_SCALE_RATIOS`, 0.5-1.75 of
            (2048, 640)). `pixel_values` is then a list with one entry per ratio (a `(batch, 3, h_r, w_r)` tensor
            with `return_tensors`), the input of `DenseClipForSemanticSegmentation.predict_probabilities`. Not with
            `segmentation_maps` (evaluate against the original label maps).
        resample (`PILImageResampling`, defaults to `PILImageResampling.BILINEAR`):
            Filter for images; label maps always use `NEAREST`.
        do_rescale (`bool`, defaults to `True`):
            Multiply pixel values by `rescale_factor`.
        rescale_factor (`float`, defaults to `1 / 255`):
            Maps the 8-bit range to [0, 1].
        do_normalize (`bool`, defaults to `True`):
            Subtract `image_mean` and divide by `image_std`, per channel.
        image_mean (`tuple[float, float, float]`, defaults to `OPENAI_CLIP_MEAN`):
            `(0.48145466, 0.4578275, 0.40821073)`, the CLIP pre-training mean (the authors' `Normalize`).
        image_std (`tuple[float, float, float]`, defaults to `OPENAI_CLIP_STD`):
            `(0.26862954, 0.26130258, 0.27577711)`, the CLIP pre-training std.
        do_reduce_labels (`bool`, defaults to `False`):
            ADE20K-style maps (0 = "other"): 0 -> 255 (ignored), `x` -> `x - 1`, 255 stays 255.
        default_to_square (`bool`, defaults to `False`):
            How an int `size` is read: `False` gives `{"shortest_edge": size}`.

    `do_center_crop` and `do_pad` are not supported (DenseCLIP's test pipeline uses neither) and raise a `ValueError`;
    outputs are always channels first.
    """

    valid_kwargs = DenseClipImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_convert_rgb = True
    do_resize = True
    size = {"shortest_edge": 640, "longest_edge": 2048}
    default_to_square = False
    size_divisor = 32
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_reduce_labels = False
    test_mode = "slide"
    scale_ratios = None
    do_center_crop = False
    do_pad = False

    def __init__(self, **kwargs: Unpack[DenseClipImageProcessorKwargs]) -> None:
        check_size_setting(kwargs.get("size"))
        super().__init__(**kwargs)
        # The base class replaces `None` by the class default; `size_divisor=None` is a real setting (disabled).
        if "size_divisor" in kwargs and kwargs["size_divisor"] is None:
            self.size_divisor = None

    def preprocess(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        **kwargs: Unpack[DenseClipImageProcessorKwargs],
    ) -> BatchFeature:
        """Preprocess images and, optionally, their segmentation maps.

        Args:
            images: One image or a list of images (PIL, NumPy `(height, width[, channels])` /
                `(channels, height, width)`, torch tensor, URL or path); a 4-D array is a batch.
            segmentation_maps: One label map per image (PIL `P`/`L`/`I;16`/`I` image or 2-D array of class ids), each
                of the same height and width as its image; a 3-D `(batch, height, width)` array is a batch.
            **kwargs: Per-call overrides of the settings listed in the class docstring, and `return_tensors`.

        Returns:
            `BatchFeature` with `pixel_values` `(batch, 3, height, width)` float32 (with `scale_ratios`: a list of
            them, one per ratio) and, with `segmentation_maps`, `labels` `(batch, height, width)` int64 (lists of
            arrays when `return_tensors=None`); without either, `test_mode` (the protocol for the model's
            `forward`).
        """
        check_size_setting(kwargs.get("size"))
        try:
            return super().preprocess(images, segmentation_maps, **kwargs)
        except StrictDataclassFieldValidationError as error:
            # transformers validates the per-call settings with huggingface_hub's strict dataclasses, whose error is
            # no TypeError; it names the setting and the accepted types.
            raise TypeError(f"{error} See the DenseClipImageProcessor docstring for each setting's type.") from error

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Open local image paths keeping their mode (16-bit, alpha, palette); URLs go through transformers.

        transformers' `load_image` converts to RGB right away, which clips 16-bit data and drops alpha; local files
        are opened here instead (EXIF orientation applied) so `process_image` converts them properly.
        """
        return _fetch_images_keeping_mode(image_url_or_urls, super().fetch_images)

    def get_resize_output_size(
        self,
        height: int,
        width: int,
        size: SizeDict | dict[str, int] | None = None,
        size_divisor: int | None = _FROM_SETTINGS,
    ) -> tuple[int, int]:
        """Output `(height, width)` of the resize for an input of `(height, width)`.

        `size` defaults to this processor's setting, `size_divisor` to the one its `test_mode` applies to images
        without label maps (`self.size_divisor` under `"whole"`, none under `"slide"`); `None` disables the rounding.
        """
        if height < 1 or width < 1:
            raise ValueError(
                f"Got an image of size (height={height}, width={width}): every image needs at least one pixel in "
                "each direction; drop or repair empty images before processing."
            )
        size = self.size if size is None else size
        size = SizeDict(**size) if isinstance(size, dict) else size
        if size_divisor is _FROM_SETTINGS:
            size_divisor = self.size_divisor if self.test_mode == "whole" else None
        new_height, new_width = _size_rule(height, width, size)
        if size_divisor:
            new_height = _round_to_multiple(new_height, size_divisor)
            new_width = _round_to_multiple(new_width, size_divisor)
        return max(1, new_height), max(1, new_width)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: ChannelDimension | str | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """One raw image -> `(3, height, width)` array in the 8-bit value range (uint8, or float32 for 16-bit/float);
        `(channels, height, width)` with `do_convert_rgb=False`.

        Float arrays are kept as given; their alpha channel (if any) counts `1 / rescale_factor` as opaque when
        `do_rescale`, else 1.
        """
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        full_scale = 1.0 / rescale_factor if do_rescale else 1.0
        return _image_to_channels_first(image, do_convert_rgb, input_data_format, full_scale)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        size_divisor: int | None = _FROM_SETTINGS,
        **kwargs: Any,
    ) -> np.ndarray:
        """Resize a `(3, height, width)` image per `size` and `size_divisor` (see `get_resize_output_size`).

        Each channel is resized as a float32 Pillow image, so nothing is rounded to 8 bits in between (Pillow's
        8-bit path rounds after each of its two passes): upscaling is exact bilinear interpolation with pixel
        centres (`align_corners=False`); downscaling uses Pillow's antialiased filter. Returns float32.
        """
        height, width = image.shape[-2:]
        new_height, new_width = self.get_resize_output_size(height, width, size, size_divisor)
        if (new_height, new_width) == (height, width):
            return image
        resample = self.resample if resample is None else resample
        channels = [
            np.asarray(Image.fromarray(channel.astype(np.float32)).resize((new_width, new_height), resample=resample))
            for channel in image
        ]
        return np.stack(channels).astype(np.float32)

    @staticmethod
    def reduce_label(label: np.ndarray) -> np.ndarray:
        """ADE20K label reduction on a `(height, width)` int64 map: 0 -> 255, 255 -> 255, other `x` -> `x - 1`."""
        reduced = label - 1
        reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
        return reduced

    @staticmethod
    def resize_label(label: np.ndarray, height: int, width: int) -> np.ndarray:
        """Nearest-neighbour resize of a `(H, W)` label map to `(height, width)`, values untouched.

        Output pixel `i` takes input pixel `floor((i + 0.5) * H / height)` (pixel centres, like Pillow's `NEAREST`).
        """
        in_height, in_width = label.shape
        rows = (2 * np.arange(height) + 1) * in_height // (2 * height)
        cols = (2 * np.arange(width) + 1) * in_width // (2 * width)
        return label[rows[:, None], cols[None, :]]

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        size_divisor: int | None,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        return_tensors: str | TensorType | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Resize, rescale and normalise prepared `(3, height, width)` images -> `pixel_values` float32."""
        processed = []
        statistics = (len(np.atleast_1d(image_mean)), len(np.atleast_1d(image_std)))
        for image in images:
            if do_normalize and any(count not in (1, image.shape[0]) for count in statistics):
                raise ValueError(
                    f"An image has {image.shape[0]} channels but image_mean / image_std have {statistics[0]} / "
                    f"{statistics[1]} values: pass one mean and std per channel, or do_convert_rgb=True to convert "
                    "the image to RGB."
                )
            if do_resize:
                image = self.resize(image, size, resample, size_divisor=size_divisor)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32, copy=False))
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def _preprocess_segmentation_maps(
        self,
        label_maps: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        size_divisor: int | None,
        do_reduce_labels: bool,
    ) -> list[np.ndarray]:
        """Reduce (optionally) and nearest-resize `(height, width)` int64 maps to their images' output size."""
        processed = []
        for label in label_maps:
            if do_reduce_labels:
                label = self.reduce_label(label)
            if do_resize:
                label = self.resize_label(label, *self.get_resize_output_size(*label.shape, size, size_divisor))
            processed.append(label)
        return processed

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        segmentation_maps: ImageInput | None = None,
        *,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | str | None,
        return_tensors: str | TensorType | None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Convert, check and process images and label maps into `pixel_values` and `labels`."""
        if kwargs.get("do_center_crop") or kwargs.get("do_pad"):
            raise ValueError(
                "DenseClipImageProcessor does not center-crop or pad (the DenseCLIP test pipeline does neither): set "
                "do_center_crop=False and do_pad=False, and use `size`/`size_divisor` to control the output size."
            )
        data_format = kwargs.get("data_format")
        if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
            raise ValueError("DenseClipImageProcessor only returns channels-first arrays: leave data_format unset.")
        size_divisor = kwargs["size_divisor"]
        if size_divisor is not None and (not isinstance(size_divisor, int) or size_divisor < 1):
            raise ValueError(f"size_divisor must be a positive int or None, got {size_divisor!r}.")
        if kwargs["test_mode"] not in TEST_MODES:
            raise ValueError(
                f"test_mode must be one of {tuple(TEST_MODES)} (the model's `config.test_mode`), got "
                f"{kwargs['test_mode']!r}."
            )
        scale_ratios = kwargs.pop("scale_ratios")
        if scale_ratios is not None:
            if not (
                isinstance(scale_ratios, (list, tuple))
                and scale_ratios
                and all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in scale_ratios)
            ):
                raise ValueError(
                    f"scale_ratios must be a non-empty list of positive numbers, e.g. {list(MULTI_SCALE_RATIOS)}, got "
                    f"{scale_ratios!r}."
                )
            if segmentation_maps is not None:
                raise ValueError(
                    "scale_ratios prepares the inputs of a multi-scale test, whose predictions come back at the "
                    "original size: pass no segmentation_maps and compare with the original label maps."
                )
        # One pass over the whole image needs sides the model accepts; the authors' windows have the crop size.
        if kwargs["test_mode"] == "slide" and segmentation_maps is None:
            size_divisor = kwargs["size_divisor"] = None

        images = _flatten_images(self.fetch_images(images))
        prepared = [
            self.process_image(
                image,
                do_convert_rgb=do_convert_rgb,
                input_data_format=input_data_format,
                do_rescale=kwargs["do_rescale"],
                rescale_factor=kwargs["rescale_factor"],
            )
            for image in images
        ]
        sizes = [kwargs["size"]] if scale_ratios is None else [scaled_size(kwargs["size"], r) for r in scale_ratios]
        per_scale = [self._preprocess(prepared, **{**kwargs, "size": size})["pixel_values"] for size in sizes]
        data = {"pixel_values": per_scale[0]}
        if segmentation_maps is None and scale_ratios is None:
            # The protocol these images are prepared for, which `DenseClipForSemanticSegmentation.forward` then runs
            # (`model(**processor(images=...))`, the `image-segmentation` pipeline).
            data["test_mode"] = kwargs["test_mode"]

        if segmentation_maps is not None:
            raw_maps = _flatten_segmentation_maps(segmentation_maps, len(images))
            if len(raw_maps) != len(images):
                raise ValueError(
                    f"Got {len(raw_maps)} segmentation maps for {len(images)} images: pass exactly one label map per "
                    "image, in the same order."
                )
            label_maps = [
                label_map_to_array(raw_map, f"Segmentation map {index}") for index, raw_map in enumerate(raw_maps)
            ]
            for index, (label, image) in enumerate(zip(label_maps, prepared, strict=True)):
                if label.shape != image.shape[-2:]:
                    raise ValueError(
                        f"Segmentation map {index} has size {tuple(label.shape)} (height, width) but its image has "
                        f"size {tuple(image.shape[-2:])}: a label map must match its image pixel for pixel. Resize "
                        "the map to the image size with nearest-neighbour interpolation (never bilinear), or pass "
                        "the matching image."
                    )
            data["labels"] = self._preprocess_segmentation_maps(
                label_maps, kwargs["do_resize"], kwargs["size"], size_divisor, kwargs["do_reduce_labels"]
            )

        if return_tensors is not None:
            for scale in per_scale:
                if len({array.shape for array in scale}) > 1:
                    shapes = sorted({tuple(array.shape[-2:]) for array in scale})
                    raise ValueError(
                        f"The processed images have different sizes {shapes} (the resize keeps each image's aspect "
                        "ratio), so they cannot be stacked into one tensor: process them one at a time, use a fixed "
                        'size={"height": h, "width": w}, or pass return_tensors=None to get lists of arrays.'
                    )
        if scale_ratios is None:
            return BatchFeature(data=data, tensor_type=return_tensors)
        if return_tensors is not None:
            per_scale = [
                BatchFeature({"scale": np.stack(scale)}, tensor_type=return_tensors)["scale"] for scale in per_scale
            ]
        return BatchFeature(data={"pixel_values": per_scale}, skip_tensor_conversion={"pixel_values"})

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: list[tuple[int, int]] | torch.Tensor | None = None,
        return_segmentation_scores: bool = False,
    ) -> list[torch.Tensor] | list[SemanticSegmentationPostProcessorOutput]:
        """Class-id maps from the model's `outputs.logits` `(batch, num_labels, height, width)`.

        Args:
            outputs: Model output with a `logits` attribute (a torch tensor or a NumPy array), e.g. a
                `DenseClipSemanticSegmenterOutput`, or the output of the ONNX Runtime wrapper
                (`denseclip_hf.onnx_inference.DenseClipOnnxSegmenter`).
            target_sizes: `(height, width)` per image (list of pairs or a `(batch, 2)` tensor), usually the original
                image sizes. The logits are resized there bilinearly (`align_corners=False`) before the argmax;
                `None` keeps the logits' size.
            return_segmentation_scores: Return, per image, a `SemanticSegmentationPostProcessorOutput` with the map
                (`segmentation`) and the logits it was taken from (`segmentation_scores`, `(num_labels, height,
                width)`, resized to the target size), as transformers' segmentation processors do.

        Returns:
            `list[torch.Tensor]`: `batch` int64 maps of shape `(height, width)` (the target size, if given); or, with
            `return_segmentation_scores`, a list of `SemanticSegmentationPostProcessorOutput`.
        """
        logits = getattr(outputs, "logits", None)
        if isinstance(logits, np.ndarray):
            logits = torch.from_numpy(logits)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
            raise TypeError(
                "outputs must have `logits` of shape (batch, num_labels, height, width), e.g. the model's output; got "
                f"{type(outputs).__name__} with logits {getattr(logits, 'shape', logits)!r}."
            )
        if target_sizes is None:
            scores = list(logits)
        else:
            sizes = check_target_sizes(target_sizes, len(logits))
            scores = [
                F.interpolate(image_logits[None], size=size, mode="bilinear", align_corners=False)[0]
                for image_logits, size in zip(logits, sizes, strict=True)
            ]
        if not return_segmentation_scores:
            return [image_scores.argmax(dim=0) for image_scores in scores]
        return [
            SemanticSegmentationPostProcessorOutput(
                data={"segmentation": image_scores.argmax(dim=0), "segmentation_scores": image_scores}
            )
            for image_scores in scores
        ]


def check_size_setting(size: Any) -> None:
    """The entry check of the `size` setting: an int > 0 (the shortest edge), a `(height, width)` pair of ints > 0,
    or a dict of the supported keys with ints > 0; otherwise a `TypeError` / `ValueError` naming the accepted forms."""
    if size is None or isinstance(size, (dict, SizeDict)):
        values = [] if size is None else [value for value in dict(size).values() if value is not None]
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        values = list(size)
    elif isinstance(size, int) and not isinstance(size, bool):
        values = [size]
    else:
        raise ValueError(f"Unsupported size {size!r} : use an int, (height, width) or {_SUPPORTED_SIZES}.")
    if not all(isinstance(value, int) and not isinstance(value, bool) and value > 0 for value in values):
        raise ValueError(
            f"size={size!r}: every size must be a positive int; use an int, (height, width) or {_SUPPORTED_SIZES}."
        )


def check_target_sizes(target_sizes: Any, batch: int) -> list[tuple[int, int]]:
    """The entry check of `post_process_semantic_segmentation(target_sizes=...)`: one `(height, width)` of positive
    ints per image (a list of pairs or a `(batch, 2)` tensor); otherwise a `TypeError` / `ValueError`."""
    if isinstance(target_sizes, torch.Tensor):
        if target_sizes.is_floating_point():
            raise TypeError(
                f"target_sizes must hold integer (height, width) pairs, got a {target_sizes.dtype} tensor."
            )
        target_sizes = target_sizes.tolist()
    if not isinstance(target_sizes, (list, tuple)):
        raise TypeError(
            f"target_sizes must be a list of (height, width) pairs or a (batch, 2) tensor, got "
            f"{type(target_sizes).__name__}."
        )
    if len(target_sizes) != batch:
        raise ValueError(
            f"Got {len(target_sizes)} target sizes for a batch of {batch} logits: pass one (height, width) per image."
        )
    sizes = []
    for size in target_sizes:
        pair = tuple(size) if isinstance(size, (list, tuple, torch.Size)) else ()
        if len(pair) != 2 or not all(
            isinstance(side, (int, np.integer)) and not isinstance(side, bool) for side in pair
        ):
            raise TypeError(f"Each of target_sizes must be a (height, width) pair of ints, got {size!r}.")
        if min(pair) < 1:
            raise ValueError(
                f"target_sizes must be positive (height, width) pairs, got {size!r}: pass the original image sizes."
            )
        sizes.append((int(pair[0]), int(pair[1])))
    return sizes


__all__ = [
    "MULTI_SCALE_RATIOS",
    "DenseClipImageProcessor",
    "image_to_rgb_array",
    "label_map_to_array",
    "scaled_size",
    "to_numpy",
]
