"""ONNX Runtime against eager PyTorch, side by side in one run on the same inputs: eager float32 (this package's
default path, `model(pixel_values, test_mode="plain")` with the class text embeddings computed once), ONNX Runtime
float32 and ONNX Runtime int8 (dynamic quantization, and static quantization calibrated on random inputs) of the
exported single pass.

    PYTHONPATH=src python benchmarks/onnx_runtime.py [--repeats 5] [--models vit-b16@512 rn50@512]
        [--device cuda] [--output benchmarks/results/onnx_runtime.json]

Full-size ViT-B/16 and RN50 with the 150 ADE20K classes and random weights, one 512x512 image (batch 1, the whole
image). Each model is exported with `denseclip_hf.export.export_onnx` (its export time is reported too). The runs
alternate, each timing is the median of `--repeats`; ratios are what to read. Output differences are against eager
float32: the largest absolute logit difference and the share of pixels whose argmax class differs. With `--device
cuda`, eager runs on the GPU and ONNX Runtime with the CUDA execution provider (onnxruntime-gpu); int8 is then left
out (ONNX Runtime's int8 kernels of these graphs are CPU kernels).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from configs import ade20k_config, save_results

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.export import export_onnx, quantize_onnx

MODELS = {"vit-b16@512": ("vit-b16", 512), "rn50@512": ("rn50", 512)}


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def session(path: Path, device: str, threads: int | None) -> onnxruntime.InferenceSession:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=providers)


def measure(encoder: str, size: int, repeats: int, device: str, threads: int | None, scratch: Path) -> list[dict]:
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(ade20k_config(encoder, size)).eval()
    processor = DenseClipImageProcessor()
    start = time.perf_counter()
    folder = export_onnx(model, processor, scratch / encoder, quantize=None if device == "cuda" else "dynamic")
    export_seconds = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    paths = {"ONNX Runtime float32": folder / "model.onnx"}
    if device == "cpu":
        paths["ONNX Runtime int8 dynamic"] = folder / "model_int8.onnx"
        paths["ONNX Runtime int8 static"] = folder / "model_int8_static.onnx"
        calibration = [torch.randn(1, 3, size, size, generator=generator).numpy() for _ in range(4)]
        quantize_onnx(folder / "model.onnx", paths["ONNX Runtime int8 static"], "static", calibration)
    model.to(device)
    inputs = pixel_values.numpy()
    with torch.no_grad():
        calls = {"eager float32": lambda: model(pixel_values.to(device), test_mode="plain").logits.cpu().numpy()}
        for name, path in paths.items():
            runner = session(path, device, threads)
            calls[name] = lambda runner=runner: runner.run(None, {"pixel_values": inputs})[0]
        outputs = {name: call() for name, call in calls.items()}  # warm-up (and the text embeddings, once)
        times = {name: [] for name in calls}
        for _ in range(repeats):  # alternating, so that load changes hit all alike
            for name, call in calls.items():
                times[name].append(seconds(call))
    reference = outputs["eager float32"]
    rows = []
    for name in calls:
        row = {
            "model": f"{encoder} @ {size}",
            "run": name,
            "device": device,
            "seconds": statistics.median(times[name]),
            "file_mb": paths[name].stat().st_size / 2**20 if name in paths else None,
            "max_abs_difference": float(np.abs(outputs[name] - reference).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "argmax_differs": float((outputs[name].argmax(1) != reference.argmax(1)).mean()),
            "export_seconds": export_seconds,
        }
        row["speedup_over_eager"] = statistics.median(times["eager float32"]) / row["seconds"]
        rows.append(row)
        print(
            f"{row['model']:>12} {name:>26}: {row['seconds']:.3f} s, {row['speedup_over_eager']:.2f}x eager; logits "
            f"differ by {row['max_abs_difference']:.1e} (scale {row['max_abs_logit']:.1f}), argmax on "
            f"{100 * row['argmax_differs']:.2f}% of pixels",
            flush=True,
        )
    return rows


def markdown(rows: list[dict], threads: dict) -> str:
    lines = [
        f"Threads: torch {threads['torch']}, ONNX Runtime {threads['onnxruntime']}. Batch 1, the whole 512x512 image, "
        "150 classes, random weights.",
        "",
        "| model | run | device | time (s) | speed-up over eager | max logit difference (scale) | argmax differs "
        "| file (MB) |",
        "|---|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        size = "" if row["file_mb"] is None else f"{row['file_mb']:.0f}"
        lines.append(
            f"| {row['model']} | {row['run']} | {row['device']} | {row['seconds']:.3f} | "
            f"{row['speedup_over_eager']:.2f}x | {row['max_abs_difference']:.1e} ({row['max_abs_logit']:.1f}) | "
            f"{100 * row['argmax_differs']:.2f}% | {size} |"
        )
    exports = {row["model"]: row["export_seconds"] for row in rows}
    lines += ["", "Export time: " + ", ".join(f"{model} {value:.0f} s" for model, value in exports.items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="Threads of torch and ONNX Runtime (default: each one's own)."
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/onnx_runtime.json"))
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [
            row
            for model in args.models
            for row in measure(*MODELS[model], args.repeats, args.device, args.threads, Path(scratch))
        ]
    threads = {"torch": torch.get_num_threads(), "onnxruntime": args.threads or "default (one per core)"}
    save_results(
        args.output,
        rows,
        markdown(rows, threads),
        device=args.device,
        threads=threads,
        onnxruntime=onnxruntime.__version__,
        providers=onnxruntime.get_available_providers(),
    )


if __name__ == "__main__":
    main()
