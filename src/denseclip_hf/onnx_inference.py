"""DenseCLIP exported to ONNX (`python -m denseclip_hf.export`), run by ONNX Runtime with NumPy arrays: no torch.

The exported graph is the model's single pass (`model(pixel_values, test_mode="plain").logits`, class text embeddings
stored in it as a constant). `DenseClipOnnxSegmenter` runs it and, around it, the authors' test protocol as the
PyTorch model does (`forward` in eval mode, `predict_probabilities`): each input cut to a multiple of the image
encoder's input granularity, the logits bilinearly resized (by the folder's `resize.onnx` graph, torch's
`align_corners=False`), sliding windows placed and averaged by `window_accumulation` (the model's own plan),
multi-scale and flipped inputs soft-maxed and averaged. Its outputs are what
`DenseClipImageProcessor.post_process_semantic_segmentation` takes; its own `post_process_semantic_segmentation`
does the same without torch.

This file imports NumPy, ONNX Runtime and the sibling `sliding_windows.py` only. Importing it as
`denseclip_hf.onnx_inference` loads the `denseclip_hf` package, which imports torch; an exported folder therefore
holds copies of both files, which run where only `numpy` and `onnxruntime` are installed (docs/deployment.md).
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    from .sliding_windows import window_accumulation
except ImportError:  # loaded as a plain file from an exported folder, next to its copy of sliding_windows.py
    from sliding_windows import window_accumulation

# What an exported folder holds (written by `denseclip_hf.export`).
ONNX_MODEL_NAME = "model.onnx"
ONNX_INT8_MODEL_NAME = "model_int8.onnx"
# A graph that resizes logits `(n, c, h, w)` to `size` `(2,)` int64 bilinearly, as torch's `F.interpolate(...,
# mode="bilinear", align_corners=False)` (half-pixel centres, no antialiasing): ONNX Runtime's multi-threaded kernel.
ONNX_RESIZE_MODEL_NAME = "resize.onnx"
ONNX_CONFIG_NAME = "onnx_config.json"
ONNX_FORMAT = "denseclip-onnx"
ONNX_FORMAT_VERSION = 1
TEST_MODES = ("slide", "whole")


def softmax_over_classes(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 (the classes) of `(batch, classes, H, W)` logits, float32."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass
class OnnxSegmenterOutput:
    """What `DenseClipOnnxSegmenter` returns: `logits` `(batch, num_labels, h, w)` float32 (the single pass: about a
    quarter of the input; a test protocol: the input size), like the PyTorch model's output `logits`."""

    logits: np.ndarray


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(side, (int, np.integer)) and side > 0 for side in pair):
        raise ValueError(f"{name} must be a positive int or (height, width) of positive ints, got {value!r}.")
    return int(pair[0]), int(pair[1])


class DenseClipOnnxSegmenter:
    """An exported DenseCLIP folder run by ONNX Runtime: `segmenter(pixel_values)` as the PyTorch model's eval-mode
    forward, `predict_probabilities` as the model's, `post_process_semantic_segmentation` as the processor's.

    Build it with `DenseClipOnnxSegmenter.from_pretrained(folder)`. Inputs are NumPy arrays (or anything
    `np.asarray` reads, such as CPU torch tensors) of normalized images `(batch, 3, height, width)`, e.g.
    `DenseClipImageProcessor(...)(images, return_tensors="np")["pixel_values"]`.
    """

    def __init__(self, session: Any, resize_session: Any, spec: dict):
        self.session = session
        self.resize_session = resize_session
        self.spec = spec
        self.input_name = spec["inputs"][0]["name"]
        self.output_name = spec["outputs"][0]["name"]
        self.num_labels: int = spec["num_labels"]
        self.num_channels: int = spec["inputs"][0]["shape"][1]
        self.id2label: dict[int, str] = {int(label): name for label, name in spec["id2label"].items()}
        self.input_size_multiple: int = spec["input_size_multiple"]
        self.minimum_input_size: int = spec["minimum_input_size"]
        protocol = spec["test_protocol"]
        self.test_mode: str = protocol["mode"]
        self.test_crop_size: tuple[int, int] = tuple(protocol["crop_size"])
        self.test_stride: tuple[int, int] = tuple(protocol["stride"])

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        quantized: bool = False,
        model_file: str | None = None,
        providers: Sequence[Any] | None = None,
        session_options: Any = None,
    ) -> "DenseClipOnnxSegmenter":
        """Loads an exported folder: `model.onnx` (`quantized=True`: `model_int8.onnx`, written by `--quantize`;
        `model_file`: another graph file of the folder), `resize.onnx` and `onnx_config.json`. `providers` are ONNX
        Runtime execution providers (default: every available one, e.g. `["CUDAExecutionProvider",
        "CPUExecutionProvider"]` with onnxruntime-gpu); `session_options` an `onnxruntime.SessionOptions`. A folder
        that is not an export is an `OSError` saying what to run."""
        import onnxruntime

        folder = Path(folder)
        spec_path = folder / ONNX_CONFIG_NAME
        if not spec_path.is_file():
            raise OSError(
                f"{folder} has no {ONNX_CONFIG_NAME}: it is not an exported DenseCLIP folder. Export a model with "
                "`python -m denseclip_hf.export --model_name_or_path MODEL --output_dir DIR`."
            )
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if spec.get("format") != ONNX_FORMAT or spec.get("format_version") != ONNX_FORMAT_VERSION:
            raise OSError(
                f"{spec_path} is not a version {ONNX_FORMAT_VERSION} {ONNX_FORMAT!r} file (format "
                f"{spec.get('format')!r}, version {spec.get('format_version')!r}): export the model again with this "
                "version of denseclip_hf."
            )
        name = model_file or (spec["int8_model_file"] if quantized else spec["model_file"])
        if name is None or not (folder / name).is_file():
            hint = "export with `--quantize dynamic` (or static)" if quantized else "export the model again"
            raise OSError(f"{folder} has no {'int8 ' if quantized else ''}ONNX model ({name}): {hint}.")
        providers = list(providers) if providers is not None else onnxruntime.get_available_providers()

        def session(path: Path) -> Any:
            return onnxruntime.InferenceSession(str(path), sess_options=session_options, providers=providers)

        return cls(session(folder / name), session(folder / spec["resize_model_file"]), spec)

    def _check_pixel_values(self, pixel_values: Any, purpose: str = "") -> np.ndarray:
        """`pixel_values` as a float32 `(batch, channels, height, width)` array; a `TypeError` / `ValueError` that
        says what to pass otherwise (as the PyTorch model's entry check)."""
        array = np.asarray(pixel_values)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(
                f"pixel_values must hold floating-point normalized images, got {array.dtype}: prepare images with "
                "DenseClipImageProcessor (return_tensors='np'), which rescales and normalizes them."
            )
        if array.ndim != 4 or array.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {self.num_channels}, height, width), got {array.shape}: add a "
                "batch dimension with `pixel_values[None]` and pass channels first."
            )
        if array.shape[0] == 0 or min(array.shape[-2:]) < self.minimum_input_size:
            raise ValueError(
                f"pixel_values of shape {array.shape} are too small{purpose}: the batch must not be empty and the "
                f"exported graph takes heights and widths of at least {self.minimum_input_size} pixels; resize or "
                "pad the images."
            )
        return np.ascontiguousarray(array, dtype=np.float32)

    def resize(self, logits: np.ndarray, size: Sequence[int]) -> np.ndarray:
        """Logits `(n, c, h, w)` bilinearly resized to `size` `(H, W)` -> float32 `(n, c, H, W)`, as torch's
        `F.interpolate(..., mode="bilinear", align_corners=False)` computes them (to float rounding: ONNX Runtime
        maps output to input coordinates with the scale H / h where torch uses h / H)."""
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        return self.resize_session.run(None, {"logits": logits, "size": np.asarray(size, dtype=np.int64)})[0]

    def run_graph(self, pixel_values: np.ndarray) -> np.ndarray:
        """The exported single pass on float32 `(batch, channels, height, width)` with sides that are multiples of
        `input_size_multiple` -> logits `(batch, num_labels, h, w)` at stride 4."""
        return self.session.run([self.output_name], {self.input_name: pixel_values})[0]

    def single_pass_logits(self, pixel_values: np.ndarray) -> np.ndarray:
        """The test protocol's single pass: `pixel_values` cut to a multiple of `input_size_multiple` (what the
        authors' patch convolution reads), then the graph -> logits `(batch, num_labels, h / 4, w / 4)`."""
        multiple = self.input_size_multiple
        height, width = (side // multiple * multiple for side in pixel_values.shape[-2:])
        return self.run_graph(np.ascontiguousarray(pixel_values[..., :height, :width]))

    def protocol_logits(
        self, pixel_values: np.ndarray, mode: str, crop_size: tuple[int, int], stride: tuple[int, int]
    ) -> np.ndarray:
        """Logits `(batch, num_labels, H, W)` at the input resolution by the authors' protocol (the PyTorch model's
        `protocol_logits`): `"whole"` is one single pass resized to the input; `"slide"` runs every window of the
        batch as one graph call, resizes each window's logits to the window, sums them into place and divides by the
        number of windows covering each pixel, touching the full-resolution logits as `window_accumulation` plans."""
        batch, _, height, width = pixel_values.shape
        if mode == "whole":
            return self.resize(self.single_pass_logits(pixel_values), (height, width))
        window, corners, writes, divisions = window_accumulation(height, width, crop_size, stride)
        crops = np.concatenate(
            [pixel_values[..., top : top + window[0], left : left + window[1]] for top, left in corners]
        )
        window_logits = self.resize(self.single_pass_logits(crops), window)
        if len(corners) == 1:
            return window_logits
        window_logits = window_logits.reshape(len(corners), batch, *window_logits.shape[1:])
        summed = np.empty((batch, window_logits.shape[2], height, width), dtype=np.float32)
        for (top, left), logits, parts in zip(corners, window_logits, writes, strict=True):
            for add, (row_begin, row_end, col_begin, col_end) in parts:
                source = logits[..., row_begin - top : row_end - top, col_begin - left : col_end - left]
                if add:
                    summed[..., row_begin:row_end, col_begin:col_end] += source
                else:
                    summed[..., row_begin:row_end, col_begin:col_end] = source
        for (row_begin, row_end, col_begin, col_end), count in divisions:
            summed[..., row_begin:row_end, col_begin:col_end] /= count
        return summed

    def _protocol(
        self,
        mode: str | None,
        crop_size: int | Sequence[int] | None,
        stride: int | Sequence[int] | None,
    ) -> tuple[str, tuple[int, int], tuple[int, int]]:
        """The given protocol settings, each defaulting to the exported model's, checked."""
        mode = self.test_mode if mode is None else mode
        if mode not in TEST_MODES:
            raise ValueError(f"mode={mode!r} is not one of {TEST_MODES}.")
        crop = self.test_crop_size if crop_size is None else _pair(crop_size, "crop_size")
        steps = self.test_stride if stride is None else _pair(stride, "stride")
        if any(side % self.input_size_multiple or side < self.minimum_input_size for side in crop):
            raise ValueError(
                f"crop_size={list(crop)} does not fit the exported graph: each side must be a multiple of "
                f"{self.input_size_multiple} and at least {self.minimum_input_size}."
            )
        if any(step > side for step, side in zip(steps, crop, strict=True)):
            raise ValueError(f"stride={list(steps)} must be no larger than the crop {list(crop)}.")
        return mode, crop, steps

    def __call__(self, pixel_values: Any, test_mode: str | None = None) -> OnnxSegmenterOutput:
        """As the PyTorch model's forward: `test_mode="plain"` is the single pass (logits at a quarter of the input,
        whose sides must be multiples of `input_size_multiple`); `"slide"` / `"whole"` the test protocol with the
        exported model's windows (logits at the input size). Default: the exported model's `test_mode`, as an
        eval-mode forward and the `image-segmentation` pipeline run it."""
        test_mode = self.test_mode if test_mode is None else test_mode
        if test_mode == "plain":
            pixel_values = self._check_pixel_values(pixel_values)
            if any(side % self.input_size_multiple for side in pixel_values.shape[-2:]):
                raise ValueError(
                    f"pixel_values height and width must be multiples of {self.input_size_multiple} for the single "
                    f"pass, got {pixel_values.shape[-2:]}: resize or pad the images, or run a test protocol "
                    "(test_mode='slide' or 'whole')."
                )
            return OnnxSegmenterOutput(logits=self.run_graph(pixel_values))
        mode, crop_size, stride = self._protocol(test_mode, None, None)
        pixel_values = self._check_pixel_values(pixel_values, " for the test protocol")
        return OnnxSegmenterOutput(logits=self.protocol_logits(pixel_values, mode, crop_size, stride))

    def predict_probabilities(
        self,
        pixel_values: Any | Sequence[Any],
        output_size: tuple[int, int],
        *,
        flip: bool = False,
        mode: str | None = None,
        crop_size: int | Sequence[int] | None = None,
        stride: int | Sequence[int] | None = None,
    ) -> np.ndarray:
        """Class probabilities `(batch, num_labels, *output_size)` float32 by the authors' test protocol, as the
        PyTorch model's `predict_probabilities`: for each input (a list of them for a multi-scale test, all with the
        same batch) and, with `flip`, its horizontal mirror, the protocol's logits bilinearly resized to
        `output_size` and soft-maxed (a mirror's mirrored back), averaged. `mode`, `crop_size` and `stride` default
        to the exported model's."""
        is_array = isinstance(pixel_values, np.ndarray) or hasattr(pixel_values, "__array__")
        inputs = [pixel_values] if is_array else list(pixel_values)
        if not inputs:
            raise TypeError("pixel_values must be a (batch, 3, height, width) array or a non-empty list of them.")
        inputs = [self._check_pixel_values(item, " for the test protocol") for item in inputs]
        if len({item.shape[:2] for item in inputs}) > 1:
            raise ValueError(
                "The inputs of a multi-scale test must hold the same images, but their (batch, channels) differ: "
                f"{[item.shape for item in inputs]}. Pass one array per scale, each of the whole batch."
            )
        size = _pair(output_size, "output_size")
        mode, crop, steps = self._protocol(mode, crop_size, stride)
        total, count = None, 0
        for item in inputs:
            for mirrored in (False, True) if flip else (False,):
                view = np.ascontiguousarray(item[..., ::-1]) if mirrored else item
                logits = self.resize(self.protocol_logits(view, mode, crop, steps), size)
                probabilities = softmax_over_classes(logits)
                probabilities = probabilities[..., ::-1] if mirrored else probabilities
                total = probabilities if total is None else total + probabilities
                count += 1
        return total / count

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | None = None
    ) -> list[np.ndarray]:
        """Class-id maps `(height, width)` int64 from `outputs.logits` `(batch, num_labels, h, w)`: per image, the
        logits bilinearly resized to its target size (if given) and the argmax over the classes, as
        `DenseClipImageProcessor.post_process_semantic_segmentation` computes them with torch."""
        logits = getattr(outputs, "logits", None)
        if logits is None or np.ndim(logits) != 4:
            raise TypeError(
                "outputs must have `logits` of shape (batch, num_labels, height, width), e.g. this segmenter's "
                f"output; got {type(outputs).__name__}."
            )
        logits = np.asarray(logits)
        if target_sizes is None:
            return list(logits.argmax(axis=1))
        sizes = np.asarray(target_sizes)
        if not np.issubdtype(sizes.dtype, np.integer) or sizes.shape != (len(logits), 2) or (sizes < 1).any():
            raise ValueError(
                f"target_sizes must be one positive (height, width) pair of ints per image ({len(logits)} images), "
                f"got {target_sizes!r}: pass the original image sizes."
            )
        return [
            self.resize(image_logits[None], size)[0].argmax(axis=0)
            for image_logits, size in zip(logits, sizes.tolist(), strict=True)
        ]


__all__ = [
    "ONNX_CONFIG_NAME",
    "ONNX_INT8_MODEL_NAME",
    "ONNX_MODEL_NAME",
    "ONNX_RESIZE_MODEL_NAME",
    "DenseClipOnnxSegmenter",
    "OnnxSegmenterOutput",
    "softmax_over_classes",
]
