"""Time and peak memory of a training step (batch 2, 512x512 crops) of the full-size ViT-B/16 and RN50 models: this
package's default against the same model computing as the authors' segmentor (`authors.py`), side by side.

    PYTHONPATH=src python benchmarks/training.py [--rounds 2] [--output benchmarks/results/training.json]

Each run is a fresh process (so that its peak resident memory is its own): AdamW over the recipe's parameter groups
(the training script's `build_optimizer`, fused; for the authors' behaviour torch's default AdamW, as mmcv builds
it, with the text tower at learning rate 0, their `lr_mult=0.0`), the losses of the paper
(decode + identity), forward, backward and step. The first step allocates the optimizer state and is not timed; the
median of the next `--steps` is. The two paths alternate process by process for `--rounds` rounds, so that load
changes hit both alike; ratios are what to read. Peak memory is the process's maximum resident set size.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from authors import behave_as_the_authors
from configs import NUM_CLASSES, ade20k_config, save_results

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.training.optimization import build_optimizer, parameter_groups
from denseclip_hf.training.recipes import RECIPES

ENCODERS = {"vit-b16": "ade20k-vit-b16", "rn50": "ade20k-rn50"}
PATHS = ("default", "authors")
BATCH, CROP = 2, 512


def one_run(encoder: str, path: str, steps: int) -> dict:
    recipe = RECIPES[ENCODERS[encoder]]
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(ade20k_config(encoder, CROP)).train()
    settings = (recipe.learning_rate, recipe.weight_decay, recipe.image_encoder_lr_multiplier)
    if path == "authors":  # mmcv's optimizer builder: torch's AdamW with its defaults
        groups = parameter_groups(model, *settings)
        groups.append({"params": behave_as_the_authors(model), "lr": 0.0, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups)
    else:  # what `examples/train_seg.py` builds
        optimizer = build_optimizer(model, *settings)
    pixel_values = torch.randn(BATCH, 3, CROP, CROP)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, CROP, CROP))
    times = []
    for _ in range(1 + steps):
        start = time.perf_counter()
        model(pixel_values, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "peak_rss_gib": peak_gib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/training.json"))
    parser.add_argument("--one", nargs=2, metavar=("ENCODER", "PATH"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_run(*args.one, args.steps)))
        return
    rows = []
    for encoder in ENCODERS:
        runs = {path: [] for path in PATHS}
        for _ in range(args.rounds):
            for path in PATHS:
                command = [sys.executable, __file__, "--one", encoder, path, "--steps", str(args.steps)]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[path].append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(encoder, path, runs[path][-1], flush=True)
        row = {"model": encoder}
        for path in PATHS:
            row[f"{path}_step_s"] = statistics.median(run["step_s"] for run in runs[path])
            row[f"{path}_peak_rss_gib"] = max(run["peak_rss_gib"] for run in runs[path])
        row["speedup"] = row["authors_step_s"] / row["default_step_s"]
        row["memory_ratio"] = row["default_peak_rss_gib"] / row["authors_peak_rss_gib"]
        rows.append(row)
    lines = [
        "| model | default step (s) | as the authors (s) | speed-up | default peak (GiB) | as the authors (GiB) "
        "| memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['model']} | {row['default_step_s']:.1f} | {row['authors_step_s']:.1f} | {row['speedup']:.2f}x | "
        f"{row['default_peak_rss_gib']:.1f} | {row['authors_peak_rss_gib']:.1f} | {row['memory_ratio']:.2f}x |"
        for row in rows
    ]
    save_results(args.output, rows, "\n".join(lines) + "\n", rounds=args.rounds)


if __name__ == "__main__":
    main()
