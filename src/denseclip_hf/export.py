"""Export DenseCLIP for semantic segmentation to ONNX, with dynamic batch, height and width.

    python -m denseclip_hf.export --model_name_or_path FOLDER_OR_REPO --output_dir DIR [--quantize dynamic]

The graph is the deployable model's single pass, `model(pixel_values, test_mode="plain").logits`: the CLIP text tower
is removed first (`remove_text_encoder`), so the class text embeddings are a constant of the graph. It is traced by
`torch.export` with symbolic batch, height and width (`torch.onnx.export(..., dynamo=True)`); `torch.export` refuses
the export when any size would be baked into the graph. The test protocol (sliding windows, whole image,
multi-scale, flips) runs around the graph in `denseclip_hf.onnx_inference`, without torch.

The output folder holds `model.onnx`, `onnx_config.json` (what the graph expects and returns, the classes, the
test protocol, the checks made at export), the processor's `preprocessor_config.json`, with `--quantize` an int8
`model_int8.onnx`, and copies of `onnx_inference.py` and `sliding_windows.py` (to run it where only NumPy and ONNX
Runtime are installed). See docs/deployment.md.
"""

import argparse
import copy
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

from . import onnx_inference, sliding_windows
from .configuration_denseclip import DenseClipConfig, check_test_protocol, input_size_multiple
from .file_utils import fsync_directory, fsync_file, write_text_atomically
from .image_processing_denseclip import DenseClipImageProcessor
from .modeling_denseclip import DenseClipForSemanticSegmentation
from .onnx_inference import (
    ONNX_CONFIG_NAME,
    ONNX_FORMAT,
    ONNX_FORMAT_VERSION,
    ONNX_INT8_MODEL_NAME,
    ONNX_MODEL_NAME,
    ONNX_RESIZE_MODEL_NAME,
)

logger = logging.getLogger(__name__)

# The graph is exported for heights and widths of at least this many pixels: twice the pyramid's coarsest stride, so
# that no feature map has a side of 1 (torch.export assumes sizes of 0 and 1 to be special and refuses to cover them).
MINIMUM_INPUT_SIZE = 64
QUANTIZATION_METHODS = ("dynamic", "static")
# What each int8 method quantizes. Dynamic quantization leaves convolutions in float32: ONNX Runtime's dynamic int8
# convolution (ConvInteger) is slower on CPU than its float32 one (docs/deployment.md).
DYNAMIC_QUANTIZED_OPERATORS = ["MatMul", "Gemm"]
STATIC_QUANTIZED_OPERATORS = ["Conv", "MatMul", "Gemm"]
# The export's own check of ONNX Runtime against eager: a larger difference is a broken export (float32 rounding of
# the tiny and the full-size models stays below 1e-4 of the logits' scale).
EXPORT_TOLERANCE = 1e-3


class DenseClipSinglePass(nn.Module):
    """The exported graph: `pixel_values` `(batch, 3, height, width)` -> `logits` `(batch, num_labels, height / 4,
    width / 4)`, the model's single pass (`test_mode="plain"`, whatever its eval-mode default)."""

    def __init__(self, model: DenseClipForSemanticSegmentation):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, test_mode="plain").logits


def deployable_copy(model: DenseClipForSemanticSegmentation) -> DenseClipForSemanticSegmentation:
    """A float32 CPU copy of `model` in eval mode without the CLIP text tower (its class text embeddings stored,
    `remove_text_encoder`); `model` is left as it is. A `ValueError` for what the export does not cover."""
    config = model.config
    if config.prompting_type == "pre_model":
        raise ValueError(
            "prompting_type='pre_model' feeds every image through the CLIP text tower (its contexts come from the "
            "image), so its class text embeddings cannot be a constant of the graph: this model is not exported. "
            "Use a post-model or language-only prompting model."
        )
    if config.decoder_type == "upernet":
        raise ValueError(
            "decoder_type='upernet' is not exported: its pyramid pooling (adaptive average pooling to "
            f"{config.upernet_pool_scales} cells) has no ONNX operator for inputs of any size, and the exporter bakes "
            "the pooling windows of the example size into the graph. Export a Semantic FPN model."
        )
    deployable = copy.deepcopy(model).float().cpu().eval()
    if deployable.base_model.has_text_tower:
        deployable.remove_text_encoder()
    return deployable


def _example_size(multiple: int) -> tuple[int, int]:
    """A non-square example input size, multiples of `multiple`, above the minimum and of no special value."""
    return tuple(-(-side // multiple) * multiple for side in (MINIMUM_INPUT_SIZE + 16, MINIMUM_INPUT_SIZE + 48))


def _dynamic_shapes(multiple: int) -> dict:
    """Batch, height and width of `pixel_values` as `torch.export` dimensions: any batch, and sides of at least
    `MINIMUM_INPUT_SIZE` that are multiples of `multiple` (`multiple * units` for a ViT's patch)."""
    sides = {}
    for axis, name in ((2, "height"), (3, "width")):
        if multiple == 1:
            sides[axis] = torch.export.Dim(name, min=MINIMUM_INPUT_SIZE)
        else:
            sides[axis] = multiple * torch.export.Dim(f"{name}_in_{multiple}s", min=-(-MINIMUM_INPUT_SIZE // multiple))
    return {"pixel_values": {0: torch.export.Dim("batch", min=1), **sides}}


def _check_against_eager(
    graph: DenseClipSinglePass, onnx_path: Path, shapes: Iterable[tuple[int, ...]]
) -> list[dict[str, Any]]:
    """ONNX Runtime's logits against eager ones on random inputs of `shapes`: `[{"shape", "max_abs_difference",
    "max_abs_logit"}]`. A `RuntimeError` when they differ by more than `EXPORT_TOLERANCE` of the logits' scale."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    checks = []
    for shape in shapes:
        pixel_values = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = graph(pixel_values).numpy()
        actual = session.run(None, {"pixel_values": pixel_values.numpy()})[0]
        if actual.shape != expected.shape:
            raise RuntimeError(f"The exported graph returns {actual.shape} for input {shape}, eager {expected.shape}.")
        difference = float(np.abs(actual - expected).max())
        scale = float(np.abs(expected).max())
        checks.append({"shape": list(shape), "max_abs_difference": difference, "max_abs_logit": scale})
        if not difference <= EXPORT_TOLERANCE * max(1.0, scale):
            raise RuntimeError(
                f"ONNX Runtime's logits differ from eager by {difference:.3g} (logits up to {scale:.3g}) for input "
                f"{shape}: the export is broken. Please report it with the model's config."
            )
    return checks


def resize_model() -> Any:
    """The graph `resize.onnx` (an `onnx.ModelProto`): `logits` `(n, c, h, w)` float32 and `size` `(2,)` int64 ->
    `resized` `(n, c, size[0], size[1])`, a bilinear resize with half-pixel centres and no antialiasing (ONNX
    `Resize`, opset 18): torch's `F.interpolate(..., mode="bilinear", align_corners=False)`."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Shape", ["logits"], ["batch_and_channels"], start=0, end=2),
        helper.make_node("Concat", ["batch_and_channels", "size"], ["sizes"], axis=0),
        helper.make_node(
            "Resize",
            ["logits", "", "", "sizes"],
            ["resized"],
            mode="linear",
            coordinate_transformation_mode="half_pixel",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "bilinear_resize",
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", "c", "h", "w"]),
            helper.make_tensor_value_info("size", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("resized", TensorProto.FLOAT, ["n", "c", "height", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def quantize_onnx(
    onnx_path: str | os.PathLike,
    output_path: str | os.PathLike,
    method: str = "dynamic",
    calibration_inputs: Iterable[np.ndarray] | None = None,
) -> dict[str, Any]:
    """Writes an int8 copy of the ONNX model `onnx_path` to `output_path` with ONNX Runtime's quantization, and
    returns its settings (for `onnx_config.json`).

    `method="dynamic"`: int8 weights of the matrix multiplications, activations quantized per call from their range
    (`quantize_dynamic`, no data needed); convolutions stay float32 (`DYNAMIC_QUANTIZED_OPERATORS`). `"static"`: int8
    weights (per channel) and activations of the convolutions and matrix multiplications in QDQ format, the activation
    ranges calibrated (min-max) on `calibration_inputs`, float32 `(batch, 3, height, width)` arrays as the graph takes
    them (`quantize_static`). Both start from ONNX Runtime's pre-processing (graph optimization,
    `quant_pre_process`)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantize={method!r} is not one of {QUANTIZATION_METHODS}.")
    with tempfile.TemporaryDirectory() as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        if method == "dynamic":
            quantize_dynamic(
                prepared, output_path, weight_type=QuantType.QInt8, op_types_to_quantize=DYNAMIC_QUANTIZED_OPERATORS
            )
            return {
                "method": "dynamic",
                "operators": DYNAMIC_QUANTIZED_OPERATORS,
                "weights": "int8",
                "activations": "uint8, range per call",
            }
        inputs = [np.ascontiguousarray(array, dtype=np.float32) for array in calibration_inputs or ()]
        if not inputs:
            raise ValueError("quantize='static' needs calibration inputs: pass calibration images.")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.remaining = iter(inputs)

            def get_next(self):
                array = next(self.remaining, None)
                return None if array is None else {"pixel_values": array}

        quantize_static(
            prepared,
            output_path,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=STATIC_QUANTIZED_OPERATORS,
        )
    return {
        "method": "static",
        "operators": STATIC_QUANTIZED_OPERATORS,
        "weights": "int8 per channel",
        "activations": "uint8, min-max calibrated",
        "calibration_inputs": len(inputs),
    }


def calibration_inputs(images: Iterable[Any], processor: DenseClipImageProcessor, multiple: int) -> list[np.ndarray]:
    """The graph inputs of calibration `images` (PIL images or arrays): each prepared by `processor` at its own size
    and cut to a multiple of `multiple`, as the test protocol feeds the graph."""
    inputs = []
    for image in images:
        pixel_values = processor(images=image, return_tensors="np")["pixel_values"]
        height, width = (side // multiple * multiple for side in pixel_values.shape[-2:])
        inputs.append(pixel_values[..., :height, :width])
    return inputs


def export_onnx(
    model: DenseClipForSemanticSegmentation,
    processor: DenseClipImageProcessor,
    output_dir: str | os.PathLike,
    *,
    quantize: str | None = None,
    calibration_images: Iterable[Any] | None = None,
    opset_version: int | None = None,
) -> Path:
    """Exports `model` to `output_dir` (a new folder, written atomically) for ONNX Runtime.

    Writes `model.onnx`: the single pass of `deployable_copy(model)`, `pixel_values` `(batch, 3, height, width)`
    float32 -> `logits` `(batch, num_labels, height / 4, width / 4)` float32, batch, height and width dynamic (sides
    at least `MINIMUM_INPUT_SIZE`, multiples of the image encoder's input granularity: the ViT's patch size, 32 for
    a transformers backbone, any size for a CLIP ResNet). ONNX Runtime is checked against eager at two shapes. With
    `quantize` (`"dynamic"`, or `"static"` calibrated on `calibration_images`, e.g. validation images), also
    `model_int8.onnx` (`quantize_onnx`). Then `onnx_config.json`, `preprocessor_config.json` (`processor`) and the
    files that run the export without torch (`onnx_inference.py`, `sliding_windows.py`).

    Returns the folder. A `TypeError` / `ValueError` for a model the export does not cover (`deployable_copy`), a
    `FileExistsError` when `output_dir` exists.
    """
    if not isinstance(model, DenseClipForSemanticSegmentation):
        raise TypeError(
            f"model must be a DenseClipForSemanticSegmentation, got {type(model).__name__}: load one with "
            "DenseClipForSemanticSegmentation.from_pretrained(...)."
        )
    if not isinstance(processor, DenseClipImageProcessor):
        raise TypeError(
            f"processor must be a DenseClipImageProcessor, got {type(processor).__name__}: load the model's with "
            "DenseClipImageProcessor.from_pretrained(...)."
        )
    if quantize is not None and quantize not in QUANTIZATION_METHODS:
        raise ValueError(f"quantize={quantize!r} is not one of {QUANTIZATION_METHODS} (or None).")
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise FileExistsError(
            f"{output_dir} already exists: export into a new folder (the export never overwrites one), or delete it."
        )
    graph = DenseClipSinglePass(deployable_copy(model))
    config = graph.model.config
    multiple = input_size_multiple(config.vision_config)
    calibration = calibration_inputs(calibration_images or (), processor, multiple) if quantize == "static" else None
    if quantize == "static" and not calibration:
        raise ValueError("quantize='static' needs calibration_images (e.g. some validation images).")

    example = torch.randn(2, config.vision_config.num_channels, *_example_size(multiple))
    # torch.export raises when a size of the example would be baked into the graph (a guard on a dynamic dimension).
    exported = torch.export.export(graph, (example,), dynamic_shapes=_dynamic_shapes(multiple), strict=False)
    program = torch.onnx.export(
        exported,
        (example,),
        dynamo=True,
        input_names=["pixel_values"],
        output_names=["logits"],
        opset_version=opset_version,
        optimize=True,
        verbose=False,
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = output_dir.with_name(f".{output_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an export of this process id that was killed
    partial.mkdir()
    try:
        program.save(str(partial / ONNX_MODEL_NAME))
        other_shape = (1, example.shape[1], example.shape[2] + 2 * multiple, example.shape[3] - multiple)
        checks = _check_against_eager(graph, partial / ONNX_MODEL_NAME, [tuple(example.shape), other_shape])
        quantization = None
        if quantize is not None:
            quantization = quantize_onnx(
                partial / ONNX_MODEL_NAME, partial / ONNX_INT8_MODEL_NAME, quantize, calibration
            )
        spec = onnx_spec(config, multiple, program.model.opset_imports.get("", None), checks, quantization)
        write_text_atomically(partial / ONNX_CONFIG_NAME, json.dumps(spec, indent=2) + "\n")
        (partial / ONNX_RESIZE_MODEL_NAME).write_bytes(resize_model().SerializeToString())
        processor.save_pretrained(partial)
        for module in (onnx_inference, sliding_windows):
            shutil.copyfile(module.__file__, partial / Path(module.__file__).name)
        for path in partial.iterdir():
            fsync_file(path)
        fsync_directory(partial)
        if output_dir.exists():
            raise FileExistsError(f"{output_dir} was created during the export: the export never overwrites a folder.")
        os.rename(partial, output_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_directory(output_dir.parent)
    return output_dir


def onnx_spec(
    config: DenseClipConfig,
    multiple: int,
    opset_version: int | None,
    checks: list[dict[str, Any]],
    quantization: dict[str, Any] | None,
) -> dict[str, Any]:
    """The contents of `onnx_config.json`: what the graph expects and returns, the classes and the test protocol
    (read by `DenseClipOnnxSegmenter`), and how the export was made and checked."""
    num_labels = config.num_labels
    mode, crop_size, stride = check_test_protocol(
        config.test_mode, config.test_crop_size, config.test_stride, config.vision_config
    )
    return {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "model_file": ONNX_MODEL_NAME,
        "int8_model_file": ONNX_INT8_MODEL_NAME if quantization is not None else None,
        "int8_quantization": quantization,
        "resize_model_file": ONNX_RESIZE_MODEL_NAME,
        "graph": "the single pass: model(pixel_values, test_mode='plain').logits, class text embeddings constant",
        "inputs": [
            {
                "name": "pixel_values",
                "dtype": "float32",
                "shape": ["batch", config.vision_config.num_channels, "height", "width"],
                "description": "normalized images (DenseClipImageProcessor); height and width at least "
                f"{MINIMUM_INPUT_SIZE} and multiples of {multiple}",
            }
        ],
        "outputs": [
            {
                "name": "logits",
                "dtype": "float32",
                "shape": ["batch", num_labels, "height / 4", "width / 4"],
                "description": "class scores at stride 4 (the image encoder's stride-4 level: sides rounded as its "
                "strided layers round them when height or width is not a multiple of 32)",
            }
        ],
        "input_size_multiple": multiple,
        "minimum_input_size": MINIMUM_INPUT_SIZE,
        "num_labels": num_labels,
        "id2label": {str(label): config.id2label[label] for label in range(num_labels)},
        "test_protocol": {"mode": mode, "crop_size": list(crop_size), "stride": list(stride)},
        "model": {
            "image_encoder_family": config.image_encoder_family,
            "prompting_type": config.prompting_type,
            "decoder_type": config.decoder_type,
        },
        "opset_version": opset_version,
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")
        },
        "checked_against_eager": checks,
    }


def load_for_export(
    model_name_or_path: str, revision: str | None = None
) -> tuple[DenseClipForSemanticSegmentation, DenseClipImageProcessor]:
    """The DenseCLIP model and processor saved in `model_name_or_path` (a folder or a Hub repository); a `ValueError`
    that says what to pass when it is not a DenseCLIP model or has no processor."""
    try:
        config = AutoConfig.from_pretrained(model_name_or_path, revision=revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not load a model config from {model_name_or_path!r}: {error}. Pass a DenseCLIP model folder (e.g. "
            "from examples/train_seg.py or `python -m denseclip_hf.convert_denseclip_original_to_hf`) or a Hub "
            "repository of one."
        ) from error
    if not isinstance(config, DenseClipConfig):
        raise ValueError(
            f"{model_name_or_path!r} is a {config.model_type!r} model, not DenseCLIP: export a DenseCLIP model folder "
            "(e.g. from examples/train_seg.py)."
        )
    try:
        processor = DenseClipImageProcessor.from_pretrained(model_name_or_path, revision=revision)
    except OSError as error:
        raise ValueError(
            f"{model_name_or_path!r} has no preprocessor_config.json: the export stores the model's processor. Save "
            "one next to the model (`DenseClipImageProcessor(...).save_pretrained(folder)`)."
        ) from error
    model = DenseClipForSemanticSegmentation.from_pretrained(model_name_or_path, revision=revision)
    return model, processor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m denseclip_hf.export", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("--model_name_or_path", required=True, help="A DenseCLIP model folder or Hub repository.")
    parser.add_argument("--output_dir", required=True, help="A new folder for the export (must not exist).")
    parser.add_argument("--revision", default=None, help="The Hub revision (branch, tag or commit).")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZATION_METHODS,
        default=None,
        help="Also write model_int8.onnx: ONNX Runtime dynamic quantization, or static with --calibration_dir.",
    )
    parser.add_argument(
        "--calibration_dir", default=None, help="Images (any PIL format) that calibrate --quantize static."
    )
    parser.add_argument("--opset_version", type=int, default=None, help="The ONNX opset (default: the exporter's).")
    args = parser.parse_args(argv)
    if (args.quantize == "static") != (args.calibration_dir is not None):
        parser.error("--calibration_dir goes with --quantize static, and --quantize static needs it.")
    if Path(args.output_dir).exists():
        parser.error(f"--output_dir {args.output_dir} already exists: pass a new folder.")
    return args


def main(argv: list[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    model, processor = load_for_export(args.model_name_or_path, args.revision)
    images = None
    if args.calibration_dir is not None:
        from PIL import Image

        paths = sorted(path for path in Path(args.calibration_dir).iterdir() if path.is_file())
        images = [Image.open(path).convert("RGB") for path in paths]
    output_dir = export_onnx(
        model,
        processor,
        args.output_dir,
        quantize=args.quantize,
        calibration_images=images,
        opset_version=args.opset_version,
    )
    spec = json.loads((output_dir / ONNX_CONFIG_NAME).read_text(encoding="utf-8"))
    for check in spec["checked_against_eager"]:
        logger.info(
            f"ONNX Runtime vs eager, input {check['shape']}: max abs difference {check['max_abs_difference']:.2e}"
        )
    logger.info(f"Exported {args.model_name_or_path} to {output_dir}")
    return output_dir


if __name__ == "__main__":
    main()


__all__ = [
    "MINIMUM_INPUT_SIZE",
    "DenseClipSinglePass",
    "calibration_inputs",
    "deployable_copy",
    "export_onnx",
    "load_for_export",
    "quantize_onnx",
]
