"""What the benchmark scripts share: full-size DenseCLIP configs of the authors' ADE20K models (random weights: speed
and size do not depend on them), the bf16 autocast of the `--bf16` runs, and the writer of their results."""

import json
from pathlib import Path

import torch
from transformers import CLIPTokenizer

from denseclip_hf import CLIP_TOKENIZER_PATH, DenseClipConfig, tokenize_class_names
from denseclip_hf.file_utils import write_text_atomically
from denseclip_hf.training.data import ADE20K_CLASS_NAMES

NUM_CLASSES = len(ADE20K_CLASS_NAMES)
# CLIP's text transformer (all released CLIP models): width 512, 12 layers, 8 heads.
CLIP_TEXT = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8)


def ade20k_config(encoder: str, image_size: int, **settings) -> DenseClipConfig:
    """`encoder` `"vit-b16"` (CLIP ViT-B/16, projection 512) or `"rn50"` (CLIP RN50, projection 1024) at
    `image_size` (the positional tables' size), with the 150 ADE20K class names (the real CLIP tokenizer: the text
    tower's cost depends on the longest name) and the paper's default settings."""
    vision = {
        "vit-b16": {"model_type": "clip_vision_model", "patch_size": 16},
        "rn50": {"model_type": "denseclip_resnet_vision"},
    }[encoder]
    tokenizer = CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH)
    return DenseClipConfig(
        vision_config={**vision, "image_size": image_size},
        text_config=CLIP_TEXT,
        projection_dim={"vit-b16": 512, "rn50": 1024}[encoder],
        id2label=dict(enumerate(ADE20K_CLASS_NAMES)),
        class_token_ids=tokenize_class_names(list(ADE20K_CLASS_NAMES), tokenizer, 5),
        **settings,
    )


def under_bf16_autocast(call):
    """`call` run under CPU bfloat16 autocast, as `accelerate`'s bf16 mixed precision (`--bf16`) runs the model."""

    def run(*args):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(*args)

    return run


def save_results(output: Path, rows: list[dict], markdown: str, **metadata) -> None:
    """Writes `output` (JSON: torch version, threads, `metadata`, `rows`) and the `markdown` table beside it (`.md`),
    atomically, and prints the table."""
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), **metadata, "rows": rows}
    write_text_atomically(output, json.dumps(result, indent=2) + "\n")
    write_text_atomically(output.with_suffix(".md"), markdown)
    print(markdown)
