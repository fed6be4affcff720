"""Time and peak memory of one training step (batch 2, 512x512 crops) of the full-size ViT-B/16 and RN50 models.

    PYTHONPATH=src python benchmarks/training.py [--output benchmarks/results/training.json]

Each model runs in a fresh process (so that its peak resident memory is its own): AdamW over the recipe's parameter
groups, the losses of the paper (decode + identity), forward, backward and step; the second step is timed (the
first allocates the optimizer state). Peak memory is the process's maximum resident set size, on a GPU
`torch.cuda.max_memory_allocated`.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from configs import NUM_CLASSES, ade20k_config

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.file_utils import write_text_atomically
from denseclip_hf.training.optimization import parameter_groups
from denseclip_hf.training.recipes import RECIPES

ENCODERS = {"vit-b16": "ade20k-vit-b16", "rn50": "ade20k-rn50"}
BATCH, CROP = 2, 512


def one_model(encoder: str) -> dict:
    recipe = RECIPES[ENCODERS[encoder]]
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(ade20k_config(encoder, CROP)).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, recipe.learning_rate, recipe.weight_decay, recipe.image_encoder_lr_multiplier)
    )
    pixel_values = torch.randn(BATCH, 3, CROP, CROP)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, CROP, CROP))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"model": encoder, "step_s": times[1], "first_step_s": times[0], "peak_rss_gib": peak_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/training.json"))
    parser.add_argument("--one", choices=ENCODERS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_model(args.one)))
        return
    rows = []
    for encoder in ENCODERS:
        command = [sys.executable, __file__, "--one", encoder]
        child = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["| model | training step (s) | peak memory (GiB) |", "|---|---|---|"]
    lines += [f"| {row['model']} | {row['step_s']:.1f} | {row['peak_rss_gib']:.1f} |" for row in rows]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(args.output, json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    write_text_atomically(args.output.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
