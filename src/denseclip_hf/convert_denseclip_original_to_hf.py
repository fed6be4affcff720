"""Converts the DenseCLIP authors' segmentation checkpoints (mmseg 0.x, github.com/raoyongming/DenseCLIP) to a folder
that `DenseClipForSemanticSegmentation.from_pretrained`, the Auto classes and the `image-segmentation` pipeline load.

    python -m denseclip_hf.convert_denseclip_original_to_hf --checkpoint denseclip_fpn_res50.pth --output_dir out

Every hyperparameter is inferred from tensor shapes; attention heads, which checkpoints do not store, default to the
authors' values (`--vision_heads`, `--text_heads`, `--context_decoder_heads` override them). The quirks of the authors'
code are handled here, not in the model:

- their ViT adds the class embedding to token 0 twice (as the token, and again on top of its position): the second
  copy is folded into row 0 of the positional embedding, since transformers' CLIP adds it once;
- their ResNet attention pool hard-codes 32 heads (`attention_pool_heads=32`);
- their CLIP + Semantic FPN baselines (`fpn_clipres50`, `fpn_clipres101`, `fpn_clipvit-b`: no `text_encoder.*`
  keys) become `prompting_type="none"`; their ViT's unused `proj` / `ln_post` are dropped, their ResNet has no
  attention pool (`CLIPResNet`), so its crop (512, the grid the others store) is the authors' config value;
- mmcv's module names (`scale_heads.L.{0,2,4}` interleaved with upsampling, `neck.*.conv`, `conv_seg`, packed q/k/v,
  `(in, out)` projection matrices) become this package's.
"""

import argparse
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from transformers import CLIPTokenizer

from .assets import CLIP_TOKENIZER_PATH
from .checkpoint_conversion import (
    CLIP_IMAGE_TOWERS,
    NORM_TENSORS,
    ClipImageTower,
    Rule,
    check_converted,
    clip_image_tower,
    clip_tower_rules,
    convert_keys,
    count_indexed,
    drop,
    infer_clip_text_config,
    load_checkpoint_file,
    rename,
    require_tensor,
    shapes_of,
    unwrap_state_dict,
    with_key_mapping,
)
from .configuration_denseclip import (
    ClipResNetSettings,
    ClipViTSettings,
    DenseClipConfig,
    describe_choices,
    image_encoder_settings,
)
from .image_processing_denseclip import DenseClipImageProcessor
from .loading_denseclip import CLIP_KEY_MAPPING, tokenize_class_names
from .loss_denseclip import LOSS_REDUCTIONS
from .modeling_denseclip import DenseClipForSemanticSegmentation

# The authors' values of what checkpoints do not store.
AUTHORS_RESNET_ATTENTION_POOL_HEADS = 32  # hard-coded in their `CLIPResNetWithAttention`
AUTHORS_CONTEXT_DECODER_HEADS = 4
# Their ResNet baselines' crop (`fpn_clipres*` configs), which a ResNet without an attention pool does not store.
AUTHORS_RESNET_CROP = 512
# Their test pipeline: mmseg `Resize(img_scale=(2048, crop), keep_ratio=True)`, the crop being the training size.
AUTHORS_TEST_LONGEST_EDGE = 2048

# Where the parts sit in `DenseClipForSemanticSegmentation`'s state dict.
_MODEL = f"{DenseClipForSemanticSegmentation.base_model_prefix}."
_PROMPTING = _MODEL + "prompting."
_CONTEXT_DECODER = _PROMPTING + "context_decoder."
_POSITIONS = _MODEL + "image_encoder.vision_model.embeddings.position_embedding.weight"
_CLASS_EMBEDDING = _MODEL + "image_encoder.vision_model.embeddings.class_embedding"
_NECK, _HEAD = "decoder.neck.", "decoder.head."


def _contexts(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The learnable contexts `(1, N, width)` -> `context_embeddings` `(N, width)`."""
    return {_PROMPTING + "context_embeddings": tensor[0]}


def _scale_head_block(name: str) -> Callable[[re.Match], str]:
    """mmseg's `scale_heads.L` interleaves conv blocks (even indices) with parameter-free upsampling (odd ones)."""
    return lambda m: f"{_HEAD}scale_heads.{m[1]}.{int(m[2]) // 2}.{name}.{m[3]}"


def _pyramid_level(match: re.Match) -> str:
    """fpn1 = [GroupNorm, ConvT, BN, GELU, ConvT], fpn2 = [GroupNorm, ConvT], fpn3 = GroupNorm, fpn4 = [GroupNorm,
    MaxPool]: the same layers, at the same indices, as `DenseClipViTPyramid.levels[0-3]`."""
    return f"{_MODEL}image_encoder.pyramid.levels.{int(match[1]) - 1}.{match[2] or 0}.{match[3]}"


@dataclass(frozen=True)
class AuthorsImageTower:
    """What the authors' code does differently per image encoder family (`DenseClipConfig.image_encoder_family`)."""

    extra_rules: list[Rule] = dataclass_field(default_factory=list)  # their keys beyond CLIP's tower
    default_heads: int | None = None  # attention heads where they deviate from CLIP's rule
    fix: Callable[[dict[str, torch.Tensor]], None] | None = None  # applied to the converted tensors
    # Their keys that a baseline without text (`prompting_type="none"`) holds but never uses.
    unused_without_text: list[str] = dataclass_field(default_factory=list)
    # The positional grid whose size is the training crop, and the crop of a checkpoint without it.
    grid_key: str = "positional_embedding"
    crop_without_grid: int | None = None


def fold_repeated_class_embedding(converted: dict[str, torch.Tensor]) -> None:
    """The authors' ViT gives token 0 the class embedding twice (the token itself, and `pos[0] + class_embedding`);
    transformers' CLIP adds it once, so the second copy moves into row 0 of the positional embedding."""
    positions = converted[_POSITIONS].clone()
    positions[0] += converted[_CLASS_EMBEDDING]
    converted[_POSITIONS] = positions


AUTHORS_IMAGE_TOWERS = {
    # Their ViT's pyramid (`fpn1-4`) and its doubled class embedding.
    ClipViTSettings.name: AuthorsImageTower(
        extra_rules=[(r"backbone\.fpn([1-4])\.(?:(\d)\.)?" + NORM_TENSORS, rename(_pyramid_level))],
        fix=fold_repeated_class_embedding,
        unused_without_text=[r"backbone\.proj", r"backbone\.ln_post\.(weight|bias)"],
    ),
    ClipResNetSettings.name: AuthorsImageTower(
        default_heads=AUTHORS_RESNET_ATTENTION_POOL_HEADS,
        grid_key="attnpool.positional_embedding",
        crop_without_grid=AUTHORS_RESNET_CROP,
    ),
}


def has_text(state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether the checkpoint has a text side: DenseCLIP's do, the CLIP + Semantic FPN baselines' have no
    `text_encoder.*` (nor contexts, context decoder or gamma)."""
    return any(key.startswith("text_encoder.") for key in state_dict)


def denseclip_rules(family: str, uses_text: bool = True) -> list[Rule]:
    """Authors' keys -> `DenseClipForSemanticSegmentation` keys, for an image encoder `family` (`"vit"`/`"resnet"`);
    without text (the baselines), the image tower's keys the model does not have are dropped."""
    unused = [] if uses_text else [(pattern, drop) for pattern in AUTHORS_IMAGE_TOWERS[family].unused_without_text]
    layer = r"context_decoder\.decoder\.(\d+)\."
    decoder_layer = _CONTEXT_DECODER + r"layers.\1."
    clip_keys = {pattern: _MODEL + target for pattern, target in CLIP_KEY_MAPPING.items()}
    return [
        *unused,
        *with_key_mapping(clip_tower_rules(CLIP_IMAGE_TOWERS[family], "backbone.", "text_encoder."), clip_keys),
        (r"contexts", _contexts),
        (r"gamma", rename(_PROMPTING + "gamma")),
        (
            r"context_decoder\.(memory|text)_proj\.(\d)\.(weight|bias)",
            rename(_CONTEXT_DECODER + r"\1_projection.\2.\3"),
        ),
        (r"context_decoder\.out_proj\.(\d)\.(weight|bias)", rename(_CONTEXT_DECODER + r"output_projection.\1.\2")),
        (layer + r"(self_attn|cross_attn)\.([qkv])_proj\.weight", rename(decoder_layer + r"\2.\3_proj.weight")),
        (layer + r"(self_attn|cross_attn)\.proj\.(weight|bias)", rename(decoder_layer + r"\2.out_proj.\3")),
        (layer + r"(norm[1-3])\.(weight|bias)", rename(decoder_layer + r"\2.\3")),
        (layer + r"mlp\.0\.(weight|bias)", rename(decoder_layer + r"fc1.\2")),
        (layer + r"mlp\.3\.(weight|bias)", rename(decoder_layer + r"fc2.\2")),
        (r"neck\.(lateral_convs|fpn_convs)\.(\d)\.conv\.(weight|bias)", rename(_NECK + r"\1.\2.\3")),
        (r"decode_head\.scale_heads\.(\d)\.(\d+)\.conv\.(weight)", rename(_scale_head_block("conv"))),
        (r"decode_head\.scale_heads\.(\d)\.(\d+)\.bn\." + NORM_TENSORS, rename(_scale_head_block("norm"))),
        (r"decode_head\.conv_seg\.(weight|bias)", rename(_HEAD + r"classifier.\1")),
        *AUTHORS_IMAGE_TOWERS[family].extra_rules,
    ]


def _score_map_level(
    state_dict: dict[str, torch.Tensor], pyramid_channels: list[int], num_classes: int
) -> dict[str, int]:
    """The pyramid level whose FPN lateral convolution reads `num_classes` extra channels: the score map's, as config
    settings (none for `num_classes=0`, a baseline without text, whose FPN reads the pyramid alone)."""
    extra = [
        require_tensor(state_dict, f"neck.lateral_convs.{level}.conv.weight", "the score map level").shape[1]
        - channels
        for level, channels in enumerate(pyramid_channels)
    ]
    if sorted(extra) != [0, 0, 0, num_classes]:
        raise ValueError(
            f"The FPN lateral convolutions read {[c + e for c, e in zip(pyramid_channels, extra, strict=True)]} "
            f"channels: expected the pyramid's {pyramid_channels} with {num_classes} score-map channels on one level."
        )
    return {"score_map_level": extra.index(num_classes)} if num_classes else {}


def _text_settings(
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    tower: ClipImageTower,
    text_heads: int | None,
    context_decoder_heads: int,
) -> dict[str, Any]:
    """The config of the checkpoint's text side (text tower, contexts, context decoder, class token ids, embedding
    size), from tensor shapes; `prompting_type="none"` for a checkpoint without text (`has_text`)."""
    if not has_text(state_dict):
        return {"prompting_type": "none"}
    text_config = infer_clip_text_config(state_dict, "text_encoder.", text_heads, "quick_gelu")
    num_contexts = require_tensor(state_dict, "contexts", "the number of contexts").shape[1]
    name_length = text_config.max_position_embeddings - num_contexts
    return {
        "text_config": text_config.to_dict(),
        "projection_dim": tower.projection_dim(state_dict, "backbone."),
        "class_token_ids": tokenize_class_names(
            class_names, CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_PATH), name_length
        ),
        "num_context_tokens": num_contexts,
        "class_name_token_length": name_length,
        "context_decoder_layers": count_indexed(state_dict, r"context_decoder\.decoder\.(\d+)\.", "decoder layers"),
        "context_decoder_hidden_size": require_tensor(
            state_dict, "context_decoder.memory_proj.1.weight", "its width"
        ).shape[0],
        "context_decoder_heads": context_decoder_heads,
    }


def infer_config(
    state_dict: dict[str, torch.Tensor],
    class_names: list[str],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    context_decoder_heads: int = AUTHORS_CONTEXT_DECODER_HEADS,
    vision_feature_layers: list[int] | None = None,
    loss_reduction: str | None = None,
    palette: list[list[int]] | None = None,
) -> DenseClipConfig:
    """The `DenseClipConfig` of an authors' state dict, from its tensor shapes and the class names.

    Heads default to `width // 64` (ViT, text; the authors' ViT-B/16 and CLIP text tower) and 32 (ResNet attention
    pool, hard-coded by the authors); `vision_feature_layers` to `[3, 5, 7, 11]` for 12 layers (their `out_indices`).
    The test protocol is the authors' `test_cfg`: sliding windows of the training crop (the size of the checkpoint's
    positional grid: 640 for ViT-B/16, 512 for RN50/RN101) every two thirds of it (426, 341).
    """
    tower = clip_image_tower(state_dict, "backbone.")
    if vision_heads is None:
        vision_heads = AUTHORS_IMAGE_TOWERS[tower.family].default_heads
    vision_config = tower.infer_config(state_dict, "backbone.", vision_heads, "quick_gelu")
    quirks = AUTHORS_IMAGE_TOWERS[tower.family]
    if f"backbone.{quirks.grid_key}" not in state_dict:
        vision_config.image_size = quirks.crop_without_grid
    num_classes = require_tensor(state_dict, "decode_head.conv_seg.weight", "the number of classes").shape[0]
    if len(class_names) != num_classes:
        raise ValueError(f"Got {len(class_names)} class names for a checkpoint with {num_classes} classes.")
    pyramid_channels = image_encoder_settings(vision_config).pyramid_channels()
    score_channels = num_classes if has_text(state_dict) else 0
    return DenseClipConfig(
        vision_config=vision_config.to_dict(),
        id2label=dict(enumerate(class_names)),
        **_text_settings(state_dict, class_names, tower, text_heads, context_decoder_heads),
        **_score_map_level(state_dict, pyramid_channels, score_channels),
        vision_feature_layers=vision_feature_layers,
        fpn_channels=require_tensor(state_dict, "neck.lateral_convs.0.conv.weight", "the FPN width").shape[0],
        decode_head_channels=require_tensor(
            state_dict, "decode_head.scale_heads.0.0.conv.weight", "the head width"
        ).shape[0],
        palette=palette,
        test_mode="slide",
        test_crop_size=vision_config.image_size,
        **({"loss_reduction": loss_reduction} if loss_reduction else {}),
    )


def convert_denseclip_checkpoint(
    checkpoint: str | os.PathLike | dict[str, Any],
    class_names: list[str] | None = None,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    context_decoder_heads: int = AUTHORS_CONTEXT_DECODER_HEADS,
    vision_feature_layers: list[int] | None = None,
    loss_reduction: str | None = None,
) -> DenseClipForSemanticSegmentation:
    """An authors' segmentation checkpoint as a `DenseClipForSemanticSegmentation` (eval mode) with the same outputs.

    Args:
        checkpoint: A checkpoint file (mmcv's `{"state_dict": ..., "meta": {"CLASSES": ..., "PALETTE": ...}}`, or a
            bare state dict; read with `torch.load(weights_only=True)`) or the loaded object.
        class_names: One name per class, in the checkpoint's order. Default: `meta["CLASSES"]`.
        vision_heads, text_heads, context_decoder_heads: Attention heads (not stored in checkpoints). Defaults: the
            authors' (ViT and text: width // 64; ResNet attention pool: 32; context decoder: 4).
        vision_feature_layers: ViT layers forming the pyramid (the authors' `out_indices`); default as
            `DenseClipConfig`.
        loss_reduction: `"mean_all_pixels"` to compute losses as the authors' mmseg does; default: the package's
            `"mean_non_ignored"`. Outputs other than losses do not depend on it.

    Raises:
        ValueError: for an unknown key, a missing one, a tensor of the wrong shape, or class names that do not fit.
    """
    source = "The checkpoint" if isinstance(checkpoint, dict) else f"Checkpoint {os.fspath(checkpoint)!r}"
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    meta = (raw.get("meta") or {}) if isinstance(raw, dict) and "state_dict" in raw else {}
    state_dict = unwrap_state_dict(raw, source)
    class_names = list(class_names if class_names is not None else meta.get("CLASSES") or [])
    if not class_names:
        raise ValueError(f"{source} has no meta['CLASSES']: pass the class names (--class_names).")
    palette = [[int(channel) for channel in colour] for colour in meta["PALETTE"]] if meta.get("PALETTE") else None
    config = infer_config(
        state_dict,
        class_names,
        vision_heads=vision_heads,
        text_heads=text_heads,
        context_decoder_heads=context_decoder_heads,
        vision_feature_layers=vision_feature_layers,
        loss_reduction=loss_reduction,
        palette=palette,
    )
    converted = convert_keys(state_dict, denseclip_rules(config.image_encoder_family, has_text(state_dict)), source)
    model = DenseClipForSemanticSegmentation(config)
    check_converted(converted, shapes_of(model), source)
    fix = AUTHORS_IMAGE_TOWERS[config.image_encoder_family].fix
    if fix is not None:
        fix(converted)
    model.load_state_dict(converted, strict=True)
    return model.eval()


def image_processor_for(config: DenseClipConfig) -> DenseClipImageProcessor:
    """The authors' test pipeline: keep-ratio resize into `(2048, crop)`, the crop being the size the checkpoint was
    trained at (its positional grid: 640 for their ViT-B/16, 512 for their ResNets), CLIP mean/std, prepared for the
    model's test protocol (sliding windows: no rounding of the resized size)."""
    crop = config.vision_config.image_size
    return DenseClipImageProcessor(
        size={"shortest_edge": crop, "longest_edge": AUTHORS_TEST_LONGEST_EDGE}, test_mode=config.test_mode
    )


def _read_class_names(value: str) -> list[str]:
    """`--class_names`: a JSON file holding a list of names, or the JSON list itself."""
    text = Path(value).read_text() if os.path.isfile(value) else value
    names = json.loads(text)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"--class_names must be a JSON list of strings (or a file holding one), got {value!r}.")
    return names


def argument_parser() -> argparse.ArgumentParser:
    """The command line of `python -m denseclip_hf.convert_denseclip_original_to_hf`."""
    parser = argparse.ArgumentParser(
        description="Convert a DenseCLIP segmentation checkpoint of the authors (mmseg) to a transformers folder."
    )
    parser.add_argument("--checkpoint", required=True, help="The authors' .pth (mmcv checkpoint or bare state dict)")
    parser.add_argument("--output_dir", required=True, help="Folder to write the model and image processor to")
    parser.add_argument("--class_names", help="JSON list of class names, or a .json file with one (default: meta)")
    parser.add_argument("--vision_heads", type=int, help="ViT heads (default width // 64) or ResNet pool heads (32)")
    parser.add_argument("--text_heads", type=int, help="Text transformer heads (default width // 64)")
    parser.add_argument("--context_decoder_heads", type=int, default=AUTHORS_CONTEXT_DECODER_HEADS)
    parser.add_argument("--vision_feature_layers", type=int, nargs=4, help="ViT layers forming the pyramid")
    parser.add_argument(
        "--loss_reduction",
        choices=list(LOSS_REDUCTIONS),
        help=f"How losses average (default: {DenseClipConfig.loss_reduction}). {describe_choices(LOSS_REDUCTIONS)}",
    )
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="Also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="With --push_to_hub: create the repository private")
    parser.add_argument("--revision", help="With --push_to_hub: the branch to commit to (made from main if new)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser()
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision apply to --push_to_hub REPO_ID")
    model = convert_denseclip_checkpoint(
        args.checkpoint,
        _read_class_names(args.class_names) if args.class_names else None,
        vision_heads=args.vision_heads,
        text_heads=args.text_heads,
        context_decoder_heads=args.context_decoder_heads,
        vision_feature_layers=args.vision_feature_layers,
        loss_reduction=args.loss_reduction,
    )
    processor = image_processor_for(model.config)
    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    config = model.config
    print(
        f"Wrote DenseCLIP ({config.image_encoder_family}, {config.num_labels} classes, score map on level "
        f"{config.score_map_level}) to {args.output_dir}"
    )
    if args.push_to_hub:
        api = HfApi()  # the token of `hf auth login` or HF_TOKEN
        repo_id = api.create_repo(args.push_to_hub, private=args.private, exist_ok=True).repo_id
        if args.revision:
            api.create_branch(repo_id, branch=args.revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=args.output_dir,
            revision=args.revision,
            commit_message=f"DenseCLIP converted from {Path(args.checkpoint).name} with denseclip_hf",
        )
        print(f"Uploaded {args.output_dir} to {commit.commit_url}")


if __name__ == "__main__":
    main()
