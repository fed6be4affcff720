"""The evaluation script's speed options (`--bf16`, `--channels_last`, `--torch_compile`) against the default float32
eager path, side by side in one run: one whole-image forward of the full-size models (150 ADE20K classes, random
weights).

    PYTHONPATH=src python benchmarks/options.py [--repeats 3] [--options bf16 channels_last compile]
        [--output benchmarks/results/options.json]

`bf16`: the forward under `torch.autocast(dtype=torch.bfloat16)` (as `accelerate`'s bf16 mixed precision runs it).
`channels_last`: the model's 4-d weights in channels-last memory (`model.to(memory_format=torch.channels_last)`, as
`--channels_last` does), so that its convolutions run channels-last.
`compile`: the model's parts compiled as `examples/evaluate_seg.py --torch_compile` does (inductor); the first call,
which compiles, is reported apart. Each row gives the speed-up over float32 eager and the largest difference of the
class probabilities (the softmax of the logits) from it.
"""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from configs import ade20k_config, save_results, under_bf16_autocast

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.training.evaluation_job import compile_model

MODELS = [("vit-b16", 512), ("rn50", 512)]
OPTIONS = ["bf16", "channels_last", "compile"]


def variants(model: DenseClipForSemanticSegmentation, options: list[str]) -> dict:
    """The calls to compare: name -> function of the pixel values returning logits."""
    calls = {"float32": lambda pixel_values: model(pixel_values, test_mode="plain").logits}
    if "bf16" in options:
        calls["bf16 autocast"] = under_bf16_autocast(calls["float32"])
    if "channels_last" in options:
        channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        calls["channels-last weights"] = lambda pixel_values: channels_last(pixel_values, test_mode="plain").logits
    if "compile" in options:
        compiled = copy.deepcopy(model)
        compile_model(compiled, "inductor", None)
        calls["torch.compile"] = lambda pixel_values: compiled(pixel_values, test_mode="plain").logits
    return calls


def measure(encoder: str, size: int, repeats: int, options: list[str]) -> list[dict]:
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(ade20k_config(encoder, size)).eval()
    pixel_values = torch.randn(1, 3, size, size)
    rows = []
    with torch.no_grad():
        calls = variants(model, options)
        first, probabilities = {}, {}
        for name, call in calls.items():
            start = time.perf_counter()
            probabilities[name] = call(pixel_values).float().softmax(1)
            first[name] = time.perf_counter() - start
        times = {name: [] for name in calls}
        for _ in range(repeats):  # alternating, so that load changes hit all alike
            for name, call in calls.items():
                start = time.perf_counter()
                call(pixel_values)
                times[name].append(time.perf_counter() - start)
    baseline = statistics.median(times["float32"])
    for name in calls:
        row = {
            "model": f"{encoder} @ {size}",
            "option": name,
            "seconds": statistics.median(times[name]),
            "first_call_s": first[name],
            "max_probability_difference": (probabilities[name] - probabilities["float32"]).abs().max().item(),
        }
        row["speedup"] = baseline / row["seconds"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--options", nargs="+", choices=OPTIONS, default=OPTIONS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/options.json"))
    args = parser.parse_args()
    rows = [row for encoder, size in MODELS for row in measure(encoder, size, args.repeats, args.options)]
    lines = [
        "| model | option | whole forward (s) | speed-up | first call (s) | max probability difference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['model']} | {row['option']} | {row['seconds']:.2f} | {row['speedup']:.2f}x | "
        f"{row['first_call_s']:.1f} | {row['max_probability_difference']:.1e} |"
        for row in rows
    ]
    save_results(args.output, rows, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
