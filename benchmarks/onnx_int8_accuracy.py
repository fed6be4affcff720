"""Accuracy of the ONNX export and its int8 versions on the synthetic validation set: mIoU of eager float32 (this
package's `predict_probabilities`), ONNX Runtime float32, dynamic int8 and static int8 (calibrated on training scenes),
and the share of pixels whose class each int8 model predicts as ONNX Runtime float32 does.

    accelerate launch examples/train_seg.py --output_dir outputs/denseclip-synthetic     # once: the default model
    PYTHONPATH=src python benchmarks/onnx_int8_accuracy.py --model_name_or_path outputs/denseclip-synthetic \
        [--calibration_samples 32] [--output benchmarks/results/onnx_int8_accuracy.json]

Every model runs the model's own test protocol (its `test_mode`, windows and stride) on each validation scene at the
size its processor prepares, and predicts at the label size, as `examples/evaluate_seg.py` does; the metrics come from
`denseclip_hf.training.metrics` (confusion matrix, mIoU). The exports are written to a temporary folder.
"""

import argparse
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch
from configs import save_results

from denseclip_hf.export import calibration_inputs, export_onnx, load_for_export, quantize_onnx
from denseclip_hf.onnx_inference import DenseClipOnnxSegmenter
from denseclip_hf.training.data import EvaluationCollator, load_segmentation_data
from denseclip_hf.training.evaluation import EvaluationProtocol, predict_label_maps
from denseclip_hf.training.metrics import confusion_matrix, segmentation_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", default="outputs/denseclip-synthetic")
    parser.add_argument("--calibration_samples", type=int, default=32, help="Training scenes that calibrate static.")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/onnx_int8_accuracy.json"))
    args = parser.parse_args()

    model, processor = load_for_export(args.model_name_or_path)
    model.eval()
    config = model.config
    data = load_segmentation_data(max_train_samples=args.calibration_samples, default_id2label=config.id2label)
    protocol = EvaluationProtocol.for_model(config)
    with tempfile.TemporaryDirectory() as scratch:
        folder = export_onnx(model, processor, Path(scratch) / "onnx", quantize="dynamic")
        spec_multiple = DenseClipOnnxSegmenter.from_pretrained(folder).input_size_multiple
        calibration = calibration_inputs(data.train["image"], processor, spec_multiple)
        static_path = folder / "model_int8_static.onnx"
        quantize_onnx(folder / "model.onnx", static_path, "static", calibration)
        segmenters = {
            "ONNX Runtime float32": DenseClipOnnxSegmenter.from_pretrained(folder),
            "ONNX Runtime int8 dynamic": DenseClipOnnxSegmenter.from_pretrained(folder, quantized=True),
            "ONNX Runtime int8 static": DenseClipOnnxSegmenter.from_pretrained(folder, model_file=static_path.name),
        }
        names = ["eager float32", *segmenters]
        confusion = {name: 0 for name in names}
        agreement = {name: 0 for name in names}
        seconds = {name: 0.0 for name in names}
        pixels = 0
        collator = EvaluationCollator(processor)
        for example in data.validation:
            batch = collator([example])
            pixel_values, label = batch["pixel_values"][0][0], batch["labels"][0]
            size = tuple(label.shape)
            predictions = {}
            start = time.perf_counter()
            predictions["eager float32"] = predict_label_maps(model, [[pixel_values]], [size], protocol)[0]
            seconds["eager float32"] += time.perf_counter() - start
            for name, segmenter in segmenters.items():
                start = time.perf_counter()
                probabilities = segmenter.predict_probabilities(pixel_values[None].numpy(), size)
                seconds[name] += time.perf_counter() - start
                predictions[name] = torch.from_numpy(probabilities.argmax(1)[0])
            for name, prediction in predictions.items():
                confusion[name] = confusion[name] + confusion_matrix(
                    prediction, label, config.num_labels, config.semantic_loss_ignore_index
                )
                agreement[name] += int((prediction == predictions["ONNX Runtime float32"]).sum())
            pixels += label.numel()

    rows = []
    for name in names:
        metrics = segmentation_metrics(confusion[name].numpy(), config.id2label)
        rows.append(
            {
                "model": name,
                "mean_iou": metrics["mean_iou"],
                "overall_accuracy": metrics["overall_accuracy"],
                "pixel_agreement_with_onnx_float32": agreement[name] / pixels,
                # Wall time of the whole set, for orientation only (benchmarks/onnx_runtime.py measures speed).
                "seconds": seconds[name],
            }
        )
        print(f"{name}: mIoU {100 * metrics['mean_iou']:.2f}, agreement {100 * agreement[name] / pixels:.3f}%")
    lines = [
        f"{len(data.validation)} synthetic validation scenes, {protocol.describe()}; model {args.model_name_or_path}; "
        f"static int8 calibrated on {len(calibration)} training scenes.",
        "",
        "| model | mIoU (%) | pixel accuracy (%) | pixels as ONNX Runtime float32 (%) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {100 * row['mean_iou']:.2f} | {100 * row['overall_accuracy']:.2f} | "
            f"{100 * row['pixel_agreement_with_onnx_float32']:.3f} |"
        )
    save_results(
        args.output,
        rows,
        "\n".join(lines) + "\n",
        model_name_or_path=args.model_name_or_path,
        protocol=protocol.to_dict(),
        validation_scenes=len(data.validation),
        calibration_scenes=len(calibration),
        onnxruntime=onnxruntime.__version__,
        pixels=pixels,
    )


if __name__ == "__main__":
    main()
