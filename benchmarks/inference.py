"""Inference speed of the default path (class text embeddings computed once, windows batched) against the same model
behaving as the authors' segmentor (text embeddings recomputed on every forward, one forward per window), side by side
in one run; GFLOPs and the FLOP floor.

    PYTHONPATH=src python benchmarks/inference.py [--repeats 3] [--models vit-b16@512 ...]
        [--default_with bf16 channels_last] [--output benchmarks/results/inference.json]

Full-size ViT-B/16 (at 512 and 640) and RN50 (at 512) with the 150 ADE20K classes and random weights, under
`torch.no_grad` (as `predict_probabilities` and the pipeline run): one forward on a `size` x `size` image ("whole"),
and the sliding-window protocol on a 512x683 image (the ADE20K shape) with `size` windows every 2/3 `size`. The two
paths alternate, each timing is the median of `--repeats`; ratios are what to read (absolute times depend on the
machine and its load). The FLOP floor is GFLOPs divided by the matmul throughput measured here: an estimate of the
time no implementation could beat on this machine (oneDNN's convolutions can run faster than this matmul).

`--default_with` runs the default path with the evaluation script's speed options (`bf16`: under bfloat16 autocast,
as `--bf16`; `channels_last`: channels-last convolution weights, as `--channels_last`), against the authors' float32
computation; the output difference then includes their rounding.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from authors import behave_as_the_authors
from configs import ade20k_config, save_results, under_bf16_autocast
from torch.utils.flop_counter import FlopCounterMode

from denseclip_hf import DenseClipForSemanticSegmentation

SLIDE_IMAGE = (512, 683)
MODELS = {"vit-b16@512": ("vit-b16", 512), "vit-b16@640": ("vit-b16", 640), "rn50@512": ("rn50", 512)}
DEFAULT_OPTIONS = ["bf16", "channels_last"]


def matmul_gflops_per_second(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def runs(model: DenseClipForSemanticSegmentation, whole: torch.Tensor, slide: torch.Tensor) -> dict:
    """The measured calls: a whole-image forward of `whole` `(1, 3, size, size)` and the sliding-window protocol
    on `slide` `(1, 3, *SLIDE_IMAGE)`."""
    size = whole.shape[-1]
    height, width = SLIDE_IMAGE
    return {
        f"whole {size}x{size}": lambda: model(whole, test_mode="plain").logits,
        f"slide {height}x{width}": lambda: model.predict_probabilities(slide, SLIDE_IMAGE, mode="slide"),
    }


def gflops(call) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        call()
    return counter.get_total_flops() / 1e9


def seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def measure(
    encoder: str, size: int, repeats: int, floor_gflops_per_second: float, default_with: list[str]
) -> list[dict]:
    torch.manual_seed(0)
    # Windows of the model's size (the authors' ViT-B/16 slides 640/426, their ResNets 512/341).
    config = ade20k_config(encoder, size, test_crop_size=size, test_stride=size * 2 // 3)
    model = DenseClipForSemanticSegmentation(config).eval()
    authors = DenseClipForSemanticSegmentation(model.config).eval()
    authors.load_state_dict(model.state_dict())
    behave_as_the_authors(authors)
    if "channels_last" in default_with:
        model.to(memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        inputs = torch.randn(1, 3, size, size), torch.randn(1, 3, *SLIDE_IMAGE)
        ours, theirs = runs(model, *inputs), runs(authors, *inputs)
        if "bf16" in default_with:
            ours = {name: under_bf16_autocast(call) for name, call in ours.items()}
        for name in ours:
            # Warm-up (and the one text-tower run of the default path); both compute the same outputs.
            difference = (ours[name]().float() - theirs[name]()).abs().max().item()
            ours_times, theirs_times = [], []
            for _ in range(repeats):  # alternating, so that load changes hit both alike
                ours_times.append(seconds(ours[name]))
                theirs_times.append(seconds(theirs[name]))
            ours_gflops, theirs_gflops = gflops(ours[name]), gflops(theirs[name])
            row = {
                "model": f"{encoder} @ {size}",
                "run": name,
                "default_s": statistics.median(ours_times),
                "authors_s": statistics.median(theirs_times),
                "default_gflops": ours_gflops,
                "authors_gflops": theirs_gflops,
                "floor_s": ours_gflops / floor_gflops_per_second,
                "max_abs_difference": difference,
            }
            row["speedup"] = row["authors_s"] / row["default_s"]
            row["default_over_floor"] = row["default_s"] / row["floor_s"]
            rows.append(row)
            print(
                f"{row['model']:>14} {name:>14}: default {row['default_s']:.2f} s, as the authors "
                f"{row['authors_s']:.2f} s -> {row['speedup']:.2f}x; {ours_gflops:.0f} vs {theirs_gflops:.0f} "
                f"GFLOPs; {row['default_over_floor']:.1f}x the FLOP floor; outputs differ by {difference:.1e}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict], floor: float, default_with: list[str]) -> str:
    lines = [
        f"Matmul throughput (FLOP floor): {floor:.0f} GFLOP/s. Default path with: "
        f"{', '.join(default_with) or 'nothing (float32, contiguous weights)'}.",
        "",
        "| model | run | default (s) | as the authors (s) | speed-up | GFLOPs default / as the authors "
        "| default / floor | max output difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['run']} | {row['default_s']:.2f} | {row['authors_s']:.2f} | "
            f"{row['speedup']:.2f}x | {row['default_gflops']:.0f} / {row['authors_gflops']:.0f} | "
            f"{row['default_over_floor']:.1f}x | {row['max_abs_difference']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--default_with", nargs="+", choices=DEFAULT_OPTIONS, default=[])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args()
    floor = matmul_gflops_per_second()
    default_with = sorted(args.default_with)
    rows = [row for model in args.models for row in measure(*MODELS[model], args.repeats, floor, default_with)]
    save_results(
        args.output, rows, markdown(rows, floor, default_with), matmul_gflops_per_s=floor, default_with=default_with
    )


if __name__ == "__main__":
    main()
