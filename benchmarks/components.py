"""The three parts of a training step that this package computes differently from the authors' code, each against
the authors' way (`authors.py`), side by side in one run: ViT-B/16 with the 150 ADE20K classes, random weights.

    PYTHONPATH=src python benchmarks/components.py [--repeats 5] [--output benchmarks/results/components.json]

- text tower, forward + backward to the contexts: the shared prompt prefix against every position of every prompt;
- decode + identity loss at 512x512, forward + backward (batch 2): `UpsampledCrossEntropy` against mmseg's
  channels-first cross-entropy;
- one AdamW step over the recipe's trainable parameters: `build_optimizer` (fused) against torch's default AdamW.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from authors import authors_loss, full_text_tower
from configs import NUM_CLASSES, ade20k_config, save_results

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.training.optimization import build_optimizer, parameter_groups
from denseclip_hf.training.recipes import RECIPES


def calls(model: DenseClipForSemanticSegmentation) -> dict[str, tuple]:
    """Part name -> (this package's call, the authors' call)."""
    text_encoder, class_token_ids = model.denseclip.text_encoder, model.denseclip.class_token_ids
    contexts = model.denseclip.prompting.context_embeddings
    logits, score_map = torch.randn(2, NUM_CLASSES, 128, 128), torch.randn(2, NUM_CLASSES, 32, 32)
    labels = torch.randint(0, NUM_CLASSES, (2, 512, 512))

    def loss(compute):
        def run():
            small, scores = logits.clone().requires_grad_(), score_map.clone().requires_grad_()
            compute(small, scores, labels)[0].backward()

        return run

    recipe = RECIPES["ade20k-vit-b16"]
    settings = (recipe.learning_rate, recipe.weight_decay, recipe.image_encoder_lr_multiplier)
    parameters = [parameter for group in parameter_groups(model, *settings) for parameter in group["params"]]
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizers = build_optimizer(model, *settings), torch.optim.AdamW(parameter_groups(model, *settings))
    return {
        "text tower forward + backward": (
            lambda: text_encoder(class_token_ids, contexts).sum().backward(),
            lambda: full_text_tower(text_encoder, class_token_ids, contexts[None]).sum().backward(),
        ),
        "decode + identity loss forward + backward": (
            loss(model.compute_loss),
            loss(lambda *inputs: authors_loss(model, *inputs)),
        ),
        "AdamW step": (optimizers[0].step, optimizers[1].step),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/components.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DenseClipForSemanticSegmentation(ade20k_config("vit-b16", 512)).train()
    rows = []
    for name, (ours, theirs) in calls(model).items():
        ours(), theirs()  # warm-up (the optimizers allocate their state)
        times = {"default": [], "authors": []}
        for _ in range(args.repeats):  # alternating, so that load changes hit both alike
            for path, call in (("default", ours), ("authors", theirs)):
                start = time.perf_counter()
                call()
                times[path].append(time.perf_counter() - start)
        row = {"part": name, **{f"{path}_s": statistics.median(values) for path, values in times.items()}}
        row["speedup"] = row["authors_s"] / row["default_s"]
        rows.append(row)
        print(row, flush=True)
    lines = ["| part | default (s) | as the authors (s) | speed-up |", "|---|---|---|---|"]
    lines += [
        f"| {row['part']} | {row['default_s']:.2f} | {row['authors_s']:.2f} | {row['speedup']:.2f}x |" for row in rows
    ]
    save_results(args.output, rows, "\n".join(lines) + "\n", repeats=args.repeats)


if __name__ == "__main__":
    main()
