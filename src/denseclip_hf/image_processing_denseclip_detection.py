"""Image processor for DenseCLIP object detection and instance segmentation (RetinaNet, Mask R-CNN; Rao et al., CVPR
2022, Tables 3-4).

Reproduces the authors' mmdet test pipeline bit for bit (`Resize(img_scale=(1333, 800), keep_ratio=True)` with
OpenCV's `INTER_LINEAR`, CLIP `Normalize` as mmcv computes it in float32, zero `Pad(size_divisor=32)` after the
normalisation) and turns COCO-format annotations into the training targets of their train pipeline (boxes, labels,
masks; mmdet's filtering of bad annotations).

`post_process_object_detection` and `post_process_instance_segmentation` turn the detectors' outputs into
transformers' result formats (the `object-detection` and `image-segmentation` pipelines call them).

OpenCV (and pycocotools, for masks) is an optional dependency, imported when first needed:
`pip install "denseclip_hf[detection]"`. This module imports only its siblings `image_processing_denseclip`,
`box_ops` and `configuration_denseclip_detection` (flat relative imports), so they ship next to saved checkpoints as
remote code.
"""

import importlib
import math
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
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
from transformers.utils import TensorType

from .box_ops import paste_masks
from .configuration_denseclip_detection import AUTHORS_MASK_THRESHOLD
from .image_processing_denseclip import (
    _fetch_images_keeping_mode,
    _flatten_images,
    _image_to_channels_first,
    _size_rule,
    check_size_setting,
)

_INSTALL_HINT = 'install the detection extra: pip install "denseclip_hf[detection]"'


class DenseClipDetectionImageProcessorKwargs(ImagesKwargs, total=False):
    """Detection-specific keyword arguments on top of transformers' `ImagesKwargs`.

    size_divisor (`int`):
        Zero-pad each normalised image at the bottom/right to a multiple of this value (mmdet `Pad(size_divisor=32)`).
    return_masks (`bool` or `None`):
        With annotations: `True` returns instance masks, `False` never, `None` when any annotation of the call has a
        `segmentation`.
    num_labels (`int` or `None`):
        Number of classes; annotations whose `category_id` is not in `[0, num_labels)` are rejected. `None` only
        rejects negative ids.
    mask_threshold (`float`):
        The default of `post_process_instance_segmentation`'s `mask_threshold` (the model's `config.mask_threshold`).
    """

    size_divisor: int
    return_masks: bool | None
    num_labels: int | None
    mask_threshold: float


def _optional_module(name: str, purpose: str) -> ModuleType:
    """Imports an optional dependency of the detection pipeline, or raises an `ImportError` saying how to get it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        package = "OpenCV" if name == "cv2" else "pycocotools"
        raise ImportError(
            f"DenseClipDetectionImageProcessor needs {package} for {purpose}: {_INSTALL_HINT}"
        ) from error


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _padded(length: int, divisor: int) -> int:
    """The smallest multiple of `divisor` that is at least `length` (mmcv `impad_to_multiple`)."""
    return math.ceil(length / divisor) * divisor


def _check_not_empty(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(
            f"Got an image of size (height={height}, width={width}): every image needs at least one pixel in each "
            "direction; drop or repair empty images before processing."
        )


def _annotations_per_image(annotations: Any, num_images: int) -> list[dict[str, Any]]:
    """`annotations=` argument -> one `{"image_id": ..., "annotations": [...]}` dict per image, checked."""
    if isinstance(annotations, dict):
        annotations = [annotations]
    if not isinstance(annotations, (list, tuple)):
        raise TypeError(
            f"annotations must be a list with one COCO-style dict per image, got {type(annotations).__name__}."
        )
    if len(annotations) != num_images:
        raise ValueError(
            f"Got {len(annotations)} annotation dicts for {num_images} images: pass exactly one "
            '{"image_id": ..., "annotations": [...]} per image, in the same order (an empty list for no objects).'
        )
    for index, target in enumerate(annotations):
        if not isinstance(target, dict) or not isinstance(target.get("annotations"), (list, tuple)):
            raise ValueError(
                f"The annotations of image {index} must be a dict "
                '{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int, ...}, ...]} (COCO '
                f"detection format), got {target!r:.200}."
            )
    return list(annotations)


def _check_object(obj: Any, where: str, num_labels: int | None) -> tuple[list[float], int]:
    """Checks one COCO object dict; returns its `[x, y, w, h]` as Python floats and its class index."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be a dict with 'bbox' and 'category_id', got {type(obj).__name__}.")
    bbox = obj.get("bbox")
    if (
        not isinstance(bbox, (list, tuple, np.ndarray))
        or len(bbox) != 4
        or not all(_is_real(value) and math.isfinite(value) for value in bbox)
    ):
        raise ValueError(f"{where} has bbox {bbox!r}: expected [x, y, width, height], 4 finite numbers (COCO format).")
    label = obj.get("category_id")
    limit = "" if num_labels is None else f" below num_labels={num_labels}"
    if not isinstance(label, (int, np.integer)) or isinstance(label, (bool, np.bool_)):
        raise ValueError(
            f"{where} has category_id {label!r}: expected the model's class index, an int >= 0{limit} (map COCO's "
            "sparse category ids to 0..K-1 first)."
        )
    if label < 0 or (num_labels is not None and label >= num_labels):
        raise ValueError(
            f"{where} has category_id {label}, an unknown class: expected the model's class index, an int >= 0{limit} "
            "(map COCO's sparse category ids to 0..K-1 first)."
        )
    if obj.get("iscrowd", 0) not in (0, 1):
        raise ValueError(f"{where} has iscrowd {obj['iscrowd']!r}: expected 0 or 1.")
    area = obj.get("area")
    if area is not None and not (_is_real(area) and math.isfinite(area)):
        raise ValueError(f"{where} has area {area!r}: expected a finite number (or no 'area' key).")
    return [float(value) for value in bbox], int(label)


def _decode_segmentation(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """COCO polygons or RLE of an object on a `(height, width)` image -> `(height, width)` uint8 mask (mmdet
    `LoadAnnotations._poly2mask`: polygons merged, uncompressed RLE converted, compressed RLE decoded)."""
    mask_utils = _optional_module("pycocotools.mask", "instance masks")
    if isinstance(segmentation, (list, tuple)):
        polygons = []
        for polygon in segmentation:
            if (
                not isinstance(polygon, (list, tuple, np.ndarray))
                or len(polygon) < 6
                or len(polygon) % 2
                or not all(_is_real(value) and math.isfinite(value) for value in polygon)
            ):
                raise ValueError(
                    f"{where} has a polygon {polygon!r:.200}: each polygon must be a flat list [x1, y1, x2, y2, ...] "
                    "of at least 3 points (6 finite numbers)."
                )
            polygons.append([float(value) for value in polygon])
        if not polygons:
            raise ValueError(f"{where} has an empty polygon list as segmentation: give at least one polygon.")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if [int(side) for side in segmentation["size"]] != [height, width]:
            raise ValueError(
                f"{where} has an RLE of size {list(segmentation['size'])} but its image is {[height, width]} "
                "(height, width): the RLE must describe the image as given."
            )
        counts = segmentation["counts"]
        if isinstance(counts, (list, tuple)):
            rle = mask_utils.frPyObjects({"size": [height, width], "counts": list(counts)}, height, width)
        elif isinstance(counts, (str, bytes)):
            rle = {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
        else:
            raise ValueError(f"{where} has RLE counts of type {type(counts).__name__}: expected a list, str or bytes.")
    else:
        raise ValueError(
            f"{where} has segmentation {segmentation!r:.200}: expected polygons [[x1, y1, x2, y2, ...], ...] or an "
            'RLE dict {"size": [height, width], "counts": ...}.'
        )
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def _output_field(outputs: Any, name: str, owner: str) -> Any:
    """`outputs.<name>` of a detector's output (a `ModelOutput`, or a dict of its fields); a `TypeError` saying what
    to pass when it is missing."""
    value = outputs.get(name) if isinstance(outputs, Mapping) else getattr(outputs, name, None)
    if value is None:
        raise TypeError(
            f"{owner} needs the detector's output with `{name}` (a DenseClipForObjectDetection / "
            f"DenseClipForInstanceSegmentation output, return_dict=True), got {type(outputs).__name__} without it."
        )
    return value


def _check_mask_threshold(mask_threshold: Any) -> None:
    if not _is_real(mask_threshold) or not 0 <= mask_threshold <= 1:
        raise ValueError(
            f"mask_threshold must be a number in [0, 1] (a probability; the authors' 0.5), got {mask_threshold!r}."
        )


def _target_sizes(target_sizes: Any, frame_sizes: torch.Tensor) -> list[tuple[int, int]]:
    """`target_sizes` (None, a `(batch, 2)` tensor or a list of `(height, width)`) as a list of int pairs, one per
    image; `None` gives the outputs' own frame sizes."""
    frames = [tuple(int(side) for side in size) for size in torch.as_tensor(frame_sizes).tolist()]
    if target_sizes is None:
        return frames
    sizes = [tuple(int(side) for side in size) for size in torch.as_tensor(target_sizes).reshape(-1, 2).tolist()]
    if len(sizes) != len(frames) or any(side < 1 for size in sizes for side in size):
        raise ValueError(
            f"target_sizes must hold one positive (height, width) per image ({len(frames)}), got {target_sizes!r}."
        )
    return sizes


def _rescale_boxes(boxes: torch.Tensor, frame_size: tuple[int, int], target_size: tuple[int, int]) -> torch.Tensor:
    """`(n, 4)` boxes in a `frame_size` image -> in a `target_size` image (each axis scaled by target / frame; the
    boxes unchanged, bit for bit, when the sizes are equal)."""
    if tuple(target_size) == tuple(frame_size):
        return boxes
    (frame_h, frame_w), (target_h, target_w) = frame_size, target_size
    return boxes * boxes.new_tensor([target_w / frame_w, target_h / frame_h] * 2)


class DenseClipDetectionImageProcessor(PilBackend):
    r"""Image processor for the DenseCLIP detectors (RetinaNet, Mask R-CNN): the authors' mmdet pipeline, exactly.

    For each image: convert to RGB (EXIF orientation applied to PIL images, as OpenCV's `IMREAD_COLOR` does), resize
    with OpenCV `INTER_LINEAR` keeping the aspect ratio (`size`), normalise with CLIP's mean/std in float32 as mmcv's
    `imnormalize`, then zero-pad at the bottom/right to a multiple of `size_divisor`; the batch is then zero-padded to
    its largest image. A batch of one image equals the authors' test input bit for bit.

    Settings (each can be given to the constructor or overridden per call):
        do_convert_rgb (`bool`, defaults to `True`):
            As [`DenseClipImageProcessor`]: grey replicated, alpha composited over white, 16-bit divided by 257.
        do_resize (`bool`, defaults to `True`):
            Resize per `size`. With `False` images keep their size (scale factors 1).
        size (`dict[str, int]`, defaults to `{"shortest_edge": 800, "longest_edge": 1333}`):
            mmdet `img_scale=(1333, 800)`, `keep_ratio=True`: `scale = min(1333 / long side, 800 / short side)`,
            each side `int(side * scale + 0.5)`; one bound alone, or a fixed `{"height": h, "width": w}` (mmdet
            `keep_ratio=False`), also work.
        resample (`PILImageResampling`, defaults to `BILINEAR`):
            Only `BILINEAR` (OpenCV `INTER_LINEAR`, the authors' interpolation) is supported.
        do_rescale (`bool`, defaults to `True`), rescale_factor (`float`, defaults to `1 / 255`):
            Values are in the 8-bit range; the normalisation works on that scale (mean and std divided by
            `rescale_factor`), as mmcv does. Without normalisation, values are multiplied by `rescale_factor`.
        do_normalize (`bool`, defaults to `True`), image_mean, image_std (defaults to CLIP's):
            `(x - mean) * (1 / std)` in float32, mean and std taken to the 8-bit scale first.
        size_divisor (`int`, defaults to `32`):
            Pad each image to a multiple of it (mmdet `Pad(size_divisor=32)`); `1` pads only to the batch's largest.
        return_masks (`bool` or `None`, defaults to `None`):
            Whether `labels` carry instance `masks`; `None`: when any annotation of the call has a `segmentation`.
        num_labels (`int` or `None`, defaults to `None`):
            Number of classes, to reject unknown `category_id`s.
        mask_threshold (`float`, defaults to 0.5, the authors' `mask_thr_binary`):
            Post-processing only: the mask probability from which a pixel belongs to an instance, when
            `post_process_instance_segmentation` is not given one. A Mask R-CNN's processor holds its
            `config.mask_threshold` (the converter and `examples/train_det.py` save it so, in
            `preprocessor_config.json`).

    `do_center_crop=True`, `do_pad=False` and channels-last outputs are not supported (`ValueError`).
    """

    valid_kwargs = DenseClipDetectionImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_convert_rgb = True
    do_resize = True
    size = {"shortest_edge": 800, "longest_edge": 1333}
    default_to_square = False
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    do_pad = True
    do_center_crop = False
    size_divisor = 32
    return_masks = None
    num_labels = None
    mask_threshold = AUTHORS_MASK_THRESHOLD

    def __init__(self, **kwargs: Unpack[DenseClipDetectionImageProcessorKwargs]) -> None:
        check_size_setting(kwargs.get("size"))
        _check_mask_threshold(kwargs.get("mask_threshold", AUTHORS_MASK_THRESHOLD))
        super().__init__(**kwargs)

    def preprocess(
        self,
        images: ImageInput,
        annotations: dict[str, Any] | list[dict[str, Any]] | None = None,
        **kwargs: Unpack[DenseClipDetectionImageProcessorKwargs],
    ) -> BatchFeature:
        """Preprocess images and, optionally, their COCO-format annotations.

        Args:
            images: One image or a list of images (PIL, NumPy `(height, width[, channels])` /
                `(channels, height, width)`, torch tensor, local path or URL); a 4-D array is a batch.
            annotations: One dict per image, `{"image_id": int, "annotations": [{"bbox": [x, y, w, h],
                "category_id": int, "iscrowd": 0 | 1, "area": float, "segmentation": polygons | RLE}, ...]}`, with
                `category_id` the model's class index (0..K-1) and coordinates in pixels of the image as given.
            **kwargs: Per-call overrides of the settings listed in the class docstring, and `return_tensors`.

        Returns:
            `BatchFeature` with `pixel_values` `(batch, 3, Hb, Wb)` float32, `image_sizes` `(batch, 2)` int64 (height,
            width after the resize, before padding), `original_sizes` `(batch, 2)` int64, `scale_factors`
            `(batch, 4)` float32 (`w_scale, h_scale, w_scale, h_scale`), and with annotations `labels`: one dict per
            image with `class_labels` `(n,)` int64, `boxes` `(n, 4)` float32 (x1, y1, x2, y2 in the resized image)
            and, with masks, `masks` `(n, Hpad, Wpad)` uint8 (the image's own padded size). Lists of NumPy arrays
            when `return_tensors=None`.
        """
        check_size_setting(kwargs.get("size"))
        try:
            return super().preprocess(images, annotations, **kwargs)
        except StrictDataclassFieldValidationError as error:
            raise TypeError(f"{error} See the DenseClipDetectionImageProcessor docstring for each setting.") from error

    def fetch_images(self, image_url_or_urls: Any) -> Any:
        """Open local image paths keeping their mode (16-bit, alpha, palette) with EXIF orientation applied; URLs go
        through transformers."""
        return _fetch_images_keeping_mode(image_url_or_urls, super().fetch_images)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: ChannelDimension | str | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """One raw image -> `(3, height, width)` array in the 8-bit value range: uint8 for 8-bit inputs, float32 for
        16-bit and float inputs. PIL images are first turned upright per their EXIF orientation tag."""
        do_convert_rgb = self.do_convert_rgb if do_convert_rgb is None else do_convert_rgb
        do_rescale = self.do_rescale if do_rescale is None else do_rescale
        rescale_factor = self.rescale_factor if rescale_factor is None else rescale_factor
        if isinstance(image, Image.Image):
            image = ImageOps.exif_transpose(image)
        full_scale = 1.0 / rescale_factor if do_rescale else 1.0
        return _image_to_channels_first(image, do_convert_rgb, input_data_format, full_scale)

    def get_resize_output_size(
        self, height: int, width: int, size: SizeDict | dict[str, int] | None = None
    ) -> tuple[int, int]:
        """Output `(height, width)` of the resize for an input of `(height, width)` (mmcv `rescale_size` for the
        default keep-ratio `size`); `size` defaults to this processor's setting."""
        _check_not_empty(height, width)
        size = self.size if size is None else size
        size = SizeDict(**size) if isinstance(size, dict) else size
        new_height, new_width = _size_rule(height, width, size)
        if new_height < 1 or new_width < 1:
            raise ValueError(
                f"An image of size (height={height}, width={width}) resizes to (height={new_height}, "
                f"width={new_width}) under size={dict(size)}: it is too thin for the size rule. Crop or pad it to a "
                "less extreme aspect ratio first."
            )
        return new_height, new_width

    def resize(
        self, image: np.ndarray, size: SizeDict, resample: PILImageResampling | int | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Resize a `(3, height, width)` image per `size` with OpenCV `INTER_LINEAR`; returns `(3, h, w)`.

        uint8 images use OpenCV's fixed-point 8-bit path (results rounded to uint8), exactly as the authors' mmcv
        `imrescale`; float32 images (16-bit and float inputs) are interpolated in float32, nothing rounded.
        """
        cv2 = _optional_module("cv2", "the resize")
        new_height, new_width = self.get_resize_output_size(*image.shape[-2:], size)
        channels_last = np.ascontiguousarray(np.moveaxis(image, 0, -1))
        resized = cv2.resize(channels_last, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(np.moveaxis(resized.reshape(new_height, new_width, -1), -1, 0))

    @staticmethod
    def rescale_and_normalize(
        image: np.ndarray,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
    ) -> np.ndarray:
        """`(3, height, width)` values in the 8-bit range -> float32, normalised as mmcv's `imnormalize`.

        With `do_normalize`, mean and std are first brought to the 8-bit scale (divided by `rescale_factor` when
        `do_rescale`) and rounded to float32 (mmdet's `Normalize` stores them so); the result is
        `(x - mean) * float32(1 / std)` in float32, the reciprocal taken in float64 (cv2 `subtract` then `multiply`).
        Without normalisation, `do_rescale` multiplies by `rescale_factor`.
        """
        image = image.astype(np.float32)
        if do_normalize:
            to_eight_bit = rescale_factor if do_rescale else 1.0
            mean = np.float32(np.broadcast_to(np.asarray(image_mean, dtype=np.float64), (3,)) / to_eight_bit)
            std = np.float32(np.broadcast_to(np.asarray(image_std, dtype=np.float64), (3,)) / to_eight_bit)
            inverse_std = np.float32(1.0 / std.astype(np.float64))
            return (image - mean[:, None, None]) * inverse_std[:, None, None]
        if do_rescale:
            return image * np.float32(rescale_factor)
        return image

    def prepare_annotation(
        self,
        target: dict[str, Any],
        image_index: int,
        original_size: tuple[int, int],
        image_size: tuple[int, int],
        padded_size: tuple[int, int],
        return_masks: bool,
        num_labels: int | None = None,
    ) -> dict[str, np.ndarray]:
        """One image's COCO annotations -> training targets in the resized image (mmdet `CocoDataset._parse_ann_info`
        + `LoadAnnotations` + `Resize` + `Pad`).

        Objects are skipped when their box does not overlap the image (zero intersection with `[0, W] x [0, H]`),
        when `area <= 0` (`w * h` without an `area` key), `w < 1` or `h < 1`, or when `iscrowd` is 1 (crowd regions
        are no targets). Kept boxes `[x, y, x + w, y + h]` (float32) are multiplied by the scale factors
        `(w_scale, h_scale, w_scale, h_scale)` and clipped to `[0, w] x [0, h]` of `image_size`. Masks are decoded at
        `original_size`, resized with OpenCV `INTER_NEAREST` to `image_size` and zero-padded to `padded_size`.

        Returns:
            `{"class_labels": (n,) int64, "boxes": (n, 4) float32}` and, with `return_masks`, `"masks": (n, Hpad,
            Wpad)` uint8.
        """
        height, width = original_size
        new_height, new_width = image_size
        image_id = target.get("image_id")
        name = f"image {image_index}" + ("" if image_id is None else f" (image_id {image_id})")
        boxes, labels, segmentations = [], [], []
        for index, obj in enumerate(target["annotations"]):
            where = f"Annotation {index} of {name}"
            (x, y, w, h), label = _check_object(obj, where, num_labels)
            overlap_w = max(0.0, min(x + w, width) - max(x, 0.0))
            overlap_h = max(0.0, min(y + h, height) - max(y, 0.0))
            area = w * h if obj.get("area") is None else obj["area"]
            if overlap_w * overlap_h == 0 or area <= 0 or w < 1 or h < 1 or obj.get("iscrowd", 0):
                continue
            if return_masks and "segmentation" not in obj:
                raise ValueError(
                    f"{where} has no 'segmentation' but masks are requested (return_masks, or other annotations of "
                    "this call have one): give every object its polygons / RLE, or pass return_masks=False."
                )
            boxes.append([x, y, x + w, y + h])
            labels.append(label)
            segmentations.append((obj.get("segmentation"), where))

        scale = np.array([new_width / width, new_height / height] * 2, dtype=np.float32)
        box_array = np.array(boxes, dtype=np.float32).reshape(-1, 4) * scale
        box_array[:, 0::2] = np.clip(box_array[:, 0::2], 0, new_width)
        box_array[:, 1::2] = np.clip(box_array[:, 1::2], 0, new_height)
        result = {"class_labels": np.array(labels, dtype=np.int64), "boxes": box_array}
        if return_masks:
            masks = np.zeros((len(segmentations), *padded_size), dtype=np.uint8)
            for mask, (segmentation, where) in zip(masks, segmentations, strict=True):
                decoded = _decode_segmentation(segmentation, height, width, where)
                if (new_height, new_width) != (height, width):
                    cv2 = _optional_module("cv2", "the mask resize")
                    decoded = cv2.resize(decoded, (new_width, new_height), interpolation=cv2.INTER_NEAREST)
                mask[:new_height, :new_width] = decoded
            result["masks"] = masks
        return result

    def _check_settings(self, kwargs: dict[str, Any]) -> None:
        """Rejects the settings this pipeline does not support, with the fix."""
        if kwargs.get("do_center_crop"):
            raise ValueError(
                "DenseClipDetectionImageProcessor does not center-crop (the authors' pipeline does not): set "
                "do_center_crop=False."
            )
        if kwargs.get("do_pad") is False:
            raise ValueError(
                "DenseClipDetectionImageProcessor always pads (the model needs one tensor and sides that are "
                "multiples of 32): leave do_pad=True; size_divisor=1 pads only to the batch's largest image."
            )
        data_format = kwargs.get("data_format")
        if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
            raise ValueError(
                "DenseClipDetectionImageProcessor only returns channels-first arrays: leave data_format unset."
            )
        if kwargs["do_resize"] and kwargs["resample"] != PILImageResampling.BILINEAR:
            raise ValueError(
                f"resample={kwargs['resample']!r}: DenseClipDetectionImageProcessor resizes with OpenCV INTER_LINEAR, "
                "as the authors; only resample=PILImageResampling.BILINEAR is supported."
            )
        size_divisor = kwargs["size_divisor"]
        if not isinstance(size_divisor, int) or isinstance(size_divisor, bool) or size_divisor < 1:
            raise ValueError(
                f"size_divisor must be a positive int (32 for the DenseCLIP detectors), got {size_divisor!r}."
            )
        num_labels = kwargs["num_labels"]
        if num_labels is not None and (
            not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1
        ):
            raise ValueError(f"num_labels must be a positive int (the number of classes) or None, got {num_labels!r}.")
        if kwargs["return_masks"] not in (None, True, False):
            raise ValueError(f"return_masks must be True, False or None (automatic), got {kwargs['return_masks']!r}.")

    def _preprocess_image_like_inputs(
        self,
        images: ImageInput,
        annotations: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        do_convert_rgb: bool,
        input_data_format: ChannelDimension | str | None,
        return_tensors: str | TensorType | None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Convert, resize, normalise and pad the images; turn annotations into `labels`."""
        self._check_settings(kwargs)
        images = _flatten_images(self.fetch_images(images))
        if not images:
            raise ValueError("Got an empty list of images: pass at least one image.")
        targets = None if annotations is None else _annotations_per_image(annotations, len(images))

        divisor = kwargs["size_divisor"]
        processed, original_sizes, image_sizes = [], [], []
        for image in images:
            image = self.process_image(
                image,
                do_convert_rgb=do_convert_rgb,
                input_data_format=input_data_format,
                do_rescale=kwargs["do_rescale"],
                rescale_factor=kwargs["rescale_factor"],
            )
            original_sizes.append(image.shape[-2:])
            _check_not_empty(*image.shape[-2:])
            if kwargs["do_resize"]:
                image = self.resize(image, kwargs["size"])
            image_sizes.append(image.shape[-2:])
            processed.append(
                self.rescale_and_normalize(
                    image,
                    kwargs["do_rescale"],
                    kwargs["rescale_factor"],
                    kwargs["do_normalize"],
                    kwargs["image_mean"],
                    kwargs["image_std"],
                )
            )

        padded_sizes = [(_padded(h, divisor), _padded(w, divisor)) for h, w in image_sizes]
        batch_height, batch_width = max(h for h, _ in padded_sizes), max(w for _, w in padded_sizes)
        pixel_values = []
        for image in processed:
            canvas = np.zeros((3, batch_height, batch_width), dtype=np.float32)
            canvas[:, : image.shape[1], : image.shape[2]] = image
            pixel_values.append(canvas)
        scale_factors = [
            np.array([new_w / w, new_h / h] * 2, dtype=np.float32)
            for (h, w), (new_h, new_w) in zip(original_sizes, image_sizes, strict=True)
        ]
        data = {
            "pixel_values": pixel_values,
            "image_sizes": [np.array(size, dtype=np.int64) for size in image_sizes],
            "original_sizes": [np.array(size, dtype=np.int64) for size in original_sizes],
            "scale_factors": scale_factors,
        }
        if targets is not None:
            return_masks = kwargs["return_masks"]
            if return_masks is None:
                return_masks = any(
                    "segmentation" in obj for t in targets for obj in t["annotations"] if isinstance(obj, dict)
                )
            data["labels"] = [
                BatchFeature(
                    self.prepare_annotation(
                        target, index, original, resized, padded, return_masks, kwargs["num_labels"]
                    ),
                    tensor_type=return_tensors,
                )
                for index, (target, original, resized, padded) in enumerate(
                    zip(targets, original_sizes, image_sizes, padded_sizes, strict=True)
                )
            ]
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion={"labels"})

    def post_process_object_detection(
        self, outputs: Any, threshold: float = 0.5, target_sizes: Any = None
    ) -> list[dict[str, torch.Tensor]]:
        """The detections of a DenseCLIP detector (RetinaNet or Mask R-CNN) above `threshold`, per image, in
        transformers' format.

        Args:
            outputs: The detector's output. Its boxes are in `outputs.frame_sizes` frames: the original images when
                the model got the processor's `scale_factors` (as `model(**processor(images))` does), else the input.
            threshold: Keep detections scoring above it (strictly). With `0.0` the result is exactly the authors'
                final detections (their own score threshold, `config.score_threshold` = 0.05, and at most
                `config.max_detections` per image are applied by the model).
            target_sizes: `(batch, 2)` tensor or list of `(height, width)`, the size of each image to give the boxes
                in; default the frame of the outputs. A size that differs from the frame scales the boxes by
                `target / frame` per axis (e.g. for a resized copy of the image).

        Returns:
            One dict per image: `"scores"` `(n,)`, `"labels"` `(n,)` (class indices into `config.id2label`),
            `"boxes"` `(n, 4)` `(x1, y1, x2, y2)` in pixels, by decreasing score.
        """
        owner = "post_process_object_detection"
        boxes, scores, labels = (_output_field(outputs, name, owner) for name in ("pred_boxes", "scores", "labels"))
        frames = [tuple(size) for size in torch.as_tensor(_output_field(outputs, "frame_sizes", owner)).tolist()]
        results = []
        for image_boxes, image_scores, image_labels, frame, target in zip(
            boxes, scores, labels, frames, _target_sizes(target_sizes, frames), strict=True
        ):
            keep = image_scores > threshold
            results.append(
                {
                    "scores": image_scores[keep],
                    "labels": image_labels[keep],
                    "boxes": _rescale_boxes(image_boxes[keep], frame, target),
                }
            )
        return results

    def post_process_instance_segmentation(
        self,
        outputs: Any,
        threshold: float = 0.5,
        mask_threshold: float | None = None,
        overlap_mask_area_threshold: float = 0.0,
        target_sizes: Any = None,
        return_binary_maps: bool = False,
    ) -> list[dict[str, Any]]:
        """The instances of a DenseCLIP Mask R-CNN above `threshold`, per image, with their masks pasted on the image
        (mmdet's `FCNMaskHead.get_seg_masks`: each 28 x 28 mask probability map sampled at the pixel centres of its
        box, `box_ops.paste_masks`).

        Args:
            outputs: The `DenseClipForInstanceSegmentation` output (boxes and mask boxes in `frame_sizes` frames,
                see `post_process_object_detection`).
            threshold: Keep instances scoring above it (strictly); `0.0`: the authors' final detections.
            mask_threshold: A pixel belongs to an instance when its mask probability is at least this. Default
                (`None`): the processor's `mask_threshold`, which a Mask R-CNN's saved processor takes from its
                `config.mask_threshold` (the authors' `mask_thr_binary`, 0.5).
            overlap_mask_area_threshold: Only without `return_binary_maps`: an instance stays in the id map when the
                share of its mask left visible (pixels covered by a higher-scoring instance go to that one) is above
                it; 0 keeps every instance with a visible pixel. The `image-segmentation` pipeline passes 0.5.
            target_sizes: `(batch, 2)` tensor or list of `(height, width)` to paste the masks on; default the frame
                of the outputs (the original images with the processor's metas). Boxes and mask boxes are scaled by
                `target / frame` per axis when it differs.
            return_binary_maps: `True`: one binary mask per instance, overlaps allowed (what COCO evaluation
                scores). `False` (default, transformers' convention, what the pipeline reads): one `(height, width)`
                map of instance ids.

        Returns:
            One dict per image: `"segmentation"`, a bool `(n, height, width)` tensor of binary masks
            (`return_binary_maps=True`) or an int64 `(height, width)` map of instance ids, -1 where there is none;
            `"segments_info"`, per instance `{"id", "label_id", "score"}` (`id`: its index in the binary masks, its
            value in the id map); `"boxes"` `(n, 4)` `(x1, y1, x2, y2)` of the same instances. By decreasing score.
        """
        owner = "post_process_instance_segmentation"
        mask_threshold = self.mask_threshold if mask_threshold is None else mask_threshold
        _check_mask_threshold(mask_threshold)
        masks, mask_boxes = (_output_field(outputs, name, owner) for name in ("pred_masks", "mask_boxes"))
        frames = [tuple(size) for size in torch.as_tensor(_output_field(outputs, "frame_sizes", owner)).tolist()]
        targets = _target_sizes(target_sizes, frames)
        detections = self.post_process_object_detection(outputs, threshold, targets)
        results = []
        for image_masks, image_mask_boxes, scores, frame, target, detected in zip(
            masks, mask_boxes, _output_field(outputs, "scores", owner), frames, targets, detections, strict=True
        ):
            keep = scores > threshold
            binary = paste_masks(
                image_masks[keep], _rescale_boxes(image_mask_boxes[keep], frame, target), target, mask_threshold
            )
            boxes, labels, instance_scores = detected["boxes"], detected["labels"], detected["scores"]
            if return_binary_maps:
                segmentation, kept = binary, torch.arange(len(binary))
            else:
                segmentation, kept = _instance_id_map(binary, overlap_mask_area_threshold)
            results.append(
                {
                    "segmentation": segmentation,
                    "segments_info": [
                        {"id": index, "label_id": int(labels[instance]), "score": float(instance_scores[instance])}
                        for index, instance in enumerate(kept.tolist())
                    ],
                    "boxes": boxes[kept],
                }
            )
        return results


def _instance_id_map(binary: torch.Tensor, overlap_mask_area_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary masks `(n, H, W)` of instances by decreasing score -> an int64 `(H, W)` map of instance ids (-1: none)
    and the indices of the instances it shows. Each pixel goes to the highest-scoring instance covering it; an
    instance is kept when its visible pixels are more than `overlap_mask_area_threshold` of its mask (and at least
    one); the kept ones are numbered 0.. in score order, the pixels of the others are -1."""
    height, width = binary.shape[-2:]
    owner = torch.full((height, width), -1, dtype=torch.long, device=binary.device)
    for instance in range(len(binary) - 1, -1, -1):  # the best last: it wins the overlaps
        owner[binary[instance]] = instance
    visible = torch.bincount(owner[owner >= 0], minlength=len(binary))[: len(binary)]
    areas = binary.flatten(1).sum(1)
    kept = ((visible > 0) & (visible > overlap_mask_area_threshold * areas)).nonzero().view(-1)
    numbers = torch.full((len(binary) + 1,), -1, dtype=torch.long, device=binary.device)
    numbers[kept] = torch.arange(len(kept), device=binary.device)
    return numbers[owner], kept  # index -1 reads the last entry, -1


__all__ = ["DenseClipDetectionImageProcessor"]
