"""Parameters and GFLOPs of each prompting variant on RN50 at 512x512 with the 150 ADE20K classes, against the
paper's Table 2 (random weights: the cost does not depend on them).

    PYTHONPATH=src python benchmarks/variants.py

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (2 per multiply-add) for one image through the whole
segmenter, with and without the text tower (150 class prompts through 12 layers, about half of the total; the
baseline, `prompting_type="none"`, has none).
"""

import argparse

import torch
from configs import ade20k_config
from torch.utils.flop_counter import FlopCounterMode

from denseclip_hf import DenseClipForSemanticSegmentation
from denseclip_hf.configuration_denseclip import PROMPTING_TYPES

# Table 2 (RN50, ADE20K, 512x512): prompting -> (row, mIoU, GFLOPs, params in M).
PAPER_TABLE_2 = {
    "none": ("CLIP (+ Semantic FPN, no text)", 39.6, 249, 31.0),
    "language_only": ("CLIP + language prompt", 42.1, 269, 46.5),
    "post_model": ("CLIP + language prompt + post-model V->L (DenseCLIP)", 43.5, 269, 50.2),
    "pre_model": ("CLIP + language prompt + pre-model V->L", 42.9, 368, 116.9),
}
CROP = 512


def measure(prompting_type: str, crop: int = CROP) -> dict[str, float]:
    """Parameters (M) and GFLOPs of one `crop` x `crop` image of the segmenter with `prompting_type`, in all and
    without the frozen CLIP text tower (which the paper's counts leave out: its params match the rest exactly)."""
    model = DenseClipForSemanticSegmentation(ade20k_config("rn50", crop, prompting_type=prompting_type)).eval()
    parameters = sum(parameter.numel() for parameter in model.parameters()) / 1e6
    text_encoder = model.base_model.text_encoder
    text_parameters = sum(p.numel() for p in text_encoder.parameters()) / 1e6 if text_encoder is not None else 0.0
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.randn(1, 3, crop, crop), test_mode="plain")
    text_counts = counter.get_flop_counts().get("DenseClipForSemanticSegmentation.denseclip.text_encoder", {})
    text_flops = sum(text_counts.values())
    flops = counter.get_total_flops()
    return {
        "params": parameters,
        "params_without_text": parameters - text_parameters,
        "gflops": flops / 1e9,
        "gflops_without_text": (flops - text_flops) / 1e9,
    }


def main() -> None:
    argparse.ArgumentParser(
        description="Parameters and GFLOPs of the Table 2 prompting variants (no options)."
    ).parse_args()
    print(
        "| prompting_type | paper row (Table 2) | params (M) | without text tower | paper | GFLOPs 512x512 | "
        "without text tower | paper |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for prompting_type in PROMPTING_TYPES:
        row, _, paper_flops, paper_params = PAPER_TABLE_2[prompting_type]
        got = measure(prompting_type)
        print(
            f"| {prompting_type} | {row} | {got['params']:.1f} | {got['params_without_text']:.1f} | {paper_params} | "
            f"{got['gflops']:.0f} | {got['gflops_without_text']:.0f} | {paper_flops} |"
        )


if __name__ == "__main__":
    main()
