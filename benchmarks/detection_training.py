"""Time and peak memory of one detection training step (RN50 RetinaNet and Mask R-CNN, batch 2 at 1333 x 800, 80 COCO
classes, random weights): this package's default against the same model computing as the authors' code, side by side.

    PYTHONPATH=src python benchmarks/detection_training.py [--rounds 1] [--steps 1] [--height 800 --width 1333]
        [--models retinanet mask_rcnn] [--output benchmarks/results/detection_training.json]

Paths (each run a fresh process, so that its peak resident memory is its own):
- `default`: what `examples/train_det.py` runs with a coco-* recipe: the text tower frozen (`requires_grad=False`,
  no optimizer state), fused AdamW over the recipe's groups, gradients clipped to 0.1 over the trained parameters;
- `authors_clip`: the same with `--clip_text_encoder_gradients` (the text tower takes gradients at learning rate 0 so
  that they count in the clipped norm, as in the authors' training): what reproducing their clip costs here;
- `authors`: the model computing as the authors' code (`authors.text_as_the_authors`: the whole text tower on every
  prompt position, its weights taking gradients), torch's default AdamW as mmcv builds it with the text tower at
  learning rate 0, the clip over every parameter with a gradient.

A step is the training forward with the losses (labels: 10 random boxes per image, with masks for Mask R-CNN),
backward, clipping and optimizer step. The first step allocates the optimizer state and is not timed; the median of
the next `--steps` is. Peak memory: the process's maximum resident set size (CPU) or the GPU's peak allocation
(`--device cuda`). The paths alternate for `--rounds` rounds; ratios are what to read: absolute times depend on the
machine and its load.
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
from authors import text_as_the_authors
from configs import save_results
from detection import MODELS, config

from denseclip_hf.training.optimization import build_optimizer, parameter_groups
from denseclip_hf.training.recipes import DETECTION_RECIPES

PATHS = ("default", "authors_clip", "authors")
RECIPES = {"retinanet": "coco-retinanet-denseclip-rn50", "mask_rcnn": "coco-maskrcnn-denseclip-rn50"}
BATCH, BOXES = 2, 10


def labels(height: int, width: int, masks: bool, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """`BOXES` random boxes (and their box-shaped masks) per image, in the input frame."""
    result = []
    for _ in range(BATCH):
        corners = torch.rand(BOXES, 2, generator=generator) * torch.tensor([width - 64, height - 64])
        sizes = 16 + torch.rand(BOXES, 2, generator=generator) * 400
        boxes = torch.cat([corners, torch.minimum(corners + sizes, torch.tensor([width, height]) - 1)], 1)
        target = {"class_labels": torch.randint(0, 80, (BOXES,), generator=generator), "boxes": boxes}
        if masks:
            target["masks"] = torch.zeros(BOXES, height, width, dtype=torch.uint8)
            for mask, (x1, y1, x2, y2) in zip(target["masks"], boxes.long().tolist(), strict=True):
                mask[y1:y2, x1:x2] = 1
        result.append(target)
    return result


def one_run(name: str, path: str, steps: int, height: int, width: int, device: str) -> dict:
    recipe = DETECTION_RECIPES[RECIPES[name]]
    torch.manual_seed(0)
    padded = (-(-height // 32) * 32, -(-width // 32) * 32)
    model = MODELS[name](config(name))
    model.resize_position_embeddings(max(32 * 42, *padded))
    model.to(device).train()
    settings = (recipe.learning_rate, recipe.weight_decay, recipe.image_encoder_lr_multiplier)
    if path == "authors":  # mmcv's optimizer builder: torch's AdamW with its defaults, the text tower at lr 0
        text_parameters = text_as_the_authors(model.denseclip)
        groups = parameter_groups(model, *settings)
        text = {id(parameter) for parameter in text_parameters}
        for group in groups:
            group["params"] = [parameter for parameter in group["params"] if id(parameter) not in text]
        groups.append({"params": text_parameters, "lr": 0.0, "weight_decay": recipe.weight_decay})
        optimizer = torch.optim.AdamW(groups)
    else:  # what `examples/train_det.py` builds
        if path == "authors_clip":
            model.denseclip.text_encoder.requires_grad_(True)
        optimizer = build_optimizer(model, *settings, device_type=device)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(BATCH, 3, *padded, generator=generator).to(device),
        "image_sizes": torch.tensor([[height, width]] * BATCH, device=device),
        "labels": [
            {key: value.to(device) for key, value in target.items()}
            for target in labels(height, width, name == "mask_rcnn", generator)
        ],
    }
    times = []
    for _ in range(1 + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"step_s": statistics.median(times[1:]), "first_step_s": times[0], "peak_gib": peak_gib}


def markdown(rows: list[dict], device: str) -> str:
    memory = "peak GPU allocation" if device == "cuda" else "peak RSS"
    lines = [
        f"| model | input | path | step (s) | speed-up vs. as the authors | {memory} (GiB) | memory ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for path in PATHS:
            lines.append(
                f"| {row['model']} | {row['input']} | {path} | {row[f'{path}_step_s']:.2f} | "
                f"{row['authors_step_s'] / row[f'{path}_step_s']:.2f}x | {row[f'{path}_peak_gib']:.2f} | "
                f"{row[f'{path}_peak_gib'] / row['authors_peak_gib']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--height", type=int, default=800, help="Image height before padding to 32 (smoke: 256).")
    parser.add_argument("--width", type=int, default=1333, help="Image width before padding to 32 (smoke: 320).")
    parser.add_argument("--models", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/detection_training.json"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    size = (args.steps, args.height, args.width, args.device)
    if args.one:
        print(json.dumps(one_run(*args.one, *size)))
        return
    rows = []
    for name in args.models:
        runs = {path: [] for path in args.paths}
        for _ in range(args.rounds):
            for path in args.paths:
                command = [sys.executable, __file__, "--one", name, path, "--steps", str(args.steps)]
                command += ["--height", str(args.height), "--width", str(args.width), "--device", args.device]
                child = subprocess.run(command, capture_output=True, text=True, check=True)
                runs[path].append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(name, path, runs[path][-1], flush=True)
        row = {"model": f"{name} RN50", "input": f"{BATCH}x{args.height}x{args.width}"}
        for path in args.paths:
            row[f"{path}_step_s"] = statistics.median(run["step_s"] for run in runs[path])
            row[f"{path}_peak_gib"] = max(run["peak_gib"] for run in runs[path])
        rows.append(row)
    table = markdown(rows, args.device) if set(args.paths) == set(PATHS) else json.dumps(rows, indent=2) + "\n"
    save_results(args.output, rows, table, rounds=args.rounds, steps=args.steps, device=args.device)


if __name__ == "__main__":
    main()
