"""Reading checkpoint files and converting their keys: OpenAI's and OpenCLIP's CLIP weights (ViT or ResNet) to this
package's layout, and the key-mapping mechanism the converters of the DenseCLIP authors' checkpoints reuse.

The ViT layout is transformers' `CLIPModel`; ResNet image towers, which transformers does not have, get the same
`vision_model.` prefix with `DenseClipResNetVisionModel` keys. `from_clip_pretrained` reads such files through
`convert_clip_checkpoint` (this module is part of the installed package, not of saved models: it is what the converter
command lines `convert_clip_original_to_hf` and `convert_denseclip_original_to_hf` are made of).

The key-mapping mechanism: a list of rules (regular expression on a source key -> new key(s) and tensor(s)), applied
so that every source key is consumed exactly once, then checked against the shapes the target model expects.
"""

import os
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import (
    CLIPConfig,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedConfig,
)

from .assets import CLIP_TOKENIZER_PATH
from .configuration_denseclip import ClipResNetSettings, ClipViTSettings, DenseClipResNetConfig
from .modeling_clip_resnet import DenseClipResNetVisionModel

# Scalars that OpenAI's TorchScript archives keep next to the weights (OpenAI's `build_model` drops them too).
_OPENAI_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
NORM_TENSORS = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# ---------------------------------------------------------------------------------------------------------------------
# The key-mapping mechanism (shared with the DenseCLIP converter)
# ---------------------------------------------------------------------------------------------------------------------

# A converter turns one matched source tensor into zero or more target tensors.
Converter = Callable[[re.Match, torch.Tensor], dict[str, torch.Tensor]]
Rule = tuple[str, Converter]
KeyTemplate = str | Callable[[re.Match], str]


def _target_key(match: re.Match, template: KeyTemplate) -> str:
    return template(match) if callable(template) else match.expand(template)


def rename(template: KeyTemplate) -> Converter:
    """The tensor unchanged under a new key: a `re` template (`\\1` for groups) or a function of the match."""
    return lambda match, tensor: {_target_key(match, template): tensor}


def transposed(template: KeyTemplate) -> Converter:
    """A projection matrix stored `(in, out)` and applied as `x @ proj` -> an `nn.Linear` weight `(out, in)`."""
    return lambda match, tensor: {_target_key(match, template): tensor.t().contiguous()}


def split_qkv(template: str) -> Converter:
    """`nn.MultiheadAttention`'s packed `in_proj_weight` `(3C, C)` / `in_proj_bias` `(3C,)` -> q, k and v tensors;
    `template` has `{}` where the projection name (`q`, `k`, `v`) goes."""

    def convert(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        key = match.expand(template)
        return {key.format(name): part.contiguous() for name, part in zip("qkv", tensor.chunk(3), strict=True)}

    return convert


def drop(match: re.Match, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """Consumes a source tensor that has no counterpart (metadata)."""
    return {}


def with_key_mapping(rules: Sequence[Rule], key_mapping: dict[str, str]) -> list[Rule]:
    """The same rules with their target keys renamed by `key_mapping` (regex -> replacement, first match wins, as
    transformers' `from_pretrained(key_mapping=...)`)."""

    def remap(key: str) -> str:
        for pattern, replacement in key_mapping.items():
            if re.search(pattern, key):
                return re.sub(pattern, replacement, key)
        return key

    def mapped(convert: Converter) -> Converter:
        return lambda match, tensor: {remap(key): value for key, value in convert(match, tensor).items()}

    return [(pattern, mapped(convert)) for pattern, convert in rules]


def convert_keys(state_dict: dict[str, torch.Tensor], rules: Sequence[Rule], source: str) -> dict[str, torch.Tensor]:
    """Applies to every key of `state_dict` the first rule whose pattern matches the whole key.

    Raises a `ValueError` listing every key that no rule knows (nothing is silently dropped), or a target key that two
    source keys would both write.
    """
    compiled = [(re.compile(pattern), convert) for pattern, convert in rules]
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        for pattern, convert in compiled:
            if match := pattern.fullmatch(key):
                for target, value in convert(match, tensor).items():
                    if target in converted:
                        raise ValueError(f"{source}: two tensors map to {target!r} (the second is {key!r}).")
                    converted[target] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{source} has {len(unknown)} unknown key(s), not converted: {sorted(unknown)}")
    return converted


def check_converted(converted: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Raises a `ValueError` listing the target tensors that `converted` lacks or has with the wrong shape."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [
        f"{key}: {tuple(converted[key].shape)} instead of {tuple(shape)}"
        for key, shape in expected.items()
        if key in converted and converted[key].shape != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors for {len(missing)} key(s) (converted names): {missing}")
    if unexpected:
        problems.append(f"{len(unexpected)} key(s) the model does not have: {unexpected}")
    if wrong:
        problems.append(f"wrong shapes: {wrong}")
    if problems:
        raise ValueError(f"{source} does not fit the inferred architecture: " + "; ".join(problems))


def shapes_of(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Size]:
    """The state-dict shapes of `module` (build it on the meta device: nothing is allocated)."""
    return {prefix + key: tensor.shape for key, tensor in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# CLIP towers: rules and hyperparameters inferred from tensor shapes
# ---------------------------------------------------------------------------------------------------------------------


def _transformer_rules(source: str, target: str) -> list[Rule]:
    """OpenAI's `ResidualAttentionBlock`s under `source` -> transformers' `CLIPEncoderLayer`s under `target`."""
    layer = source + r"(\d+)\."
    return [
        (layer + r"attn\.in_proj_(weight|bias)", split_qkv(target + r"\1.self_attn.{}_proj.\2")),
        (layer + r"attn\.out_proj\.(weight|bias)", rename(target + r"\1.self_attn.out_proj.\2")),
        (layer + r"ln_1\.(weight|bias)", rename(target + r"\1.layer_norm1.\2")),
        (layer + r"ln_2\.(weight|bias)", rename(target + r"\1.layer_norm2.\2")),
        (layer + r"mlp\.c_fc\.(weight|bias)", rename(target + r"\1.mlp.fc1.\2")),
        (layer + r"mlp\.c_proj\.(weight|bias)", rename(target + r"\1.mlp.fc2.\2")),
    ]


def clip_text_rules(prefix: str) -> list[Rule]:
    """OpenAI's text transformer under `prefix` -> `CLIPModel`'s `text_model.*` and `text_projection.weight`."""
    p = re.escape(prefix)
    return [
        (p + r"token_embedding\.weight", rename("text_model.embeddings.token_embedding.weight")),
        (p + r"positional_embedding", rename("text_model.embeddings.position_embedding.weight")),
        (p + r"ln_final\.(weight|bias)", rename(r"text_model.final_layer_norm.\1")),
        (p + r"text_projection", transposed("text_projection.weight")),
        *_transformer_rules(p + r"transformer\.resblocks\.", "text_model.encoder.layers."),
    ]


def clip_vit_rules(prefix: str) -> list[Rule]:
    """OpenAI's `VisionTransformer` under `prefix` -> `CLIPModel`'s `vision_model.*` and `visual_projection.weight`."""
    p = re.escape(prefix)
    return [
        (p + r"conv1\.weight", rename("vision_model.embeddings.patch_embedding.weight")),
        (p + r"class_embedding", rename("vision_model.embeddings.class_embedding")),
        (p + r"positional_embedding", rename("vision_model.embeddings.position_embedding.weight")),
        (p + r"ln_pre\.(weight|bias)", rename(r"vision_model.pre_layrnorm.\1")),
        (p + r"ln_post\.(weight|bias)", rename(r"vision_model.post_layernorm.\1")),
        (p + r"proj", transposed("visual_projection.weight")),
        *_transformer_rules(p + r"transformer\.resblocks\.", "vision_model.encoder.layers."),
    ]


def clip_resnet_rules(prefix: str) -> list[Rule]:
    """OpenAI's `ModifiedResNet` under `prefix` -> `vision_model.*` keys of a `DenseClipResNetVisionModel`."""
    p = re.escape(prefix)
    block = p + r"layer([1-4])\.(\d+)\."

    def in_block(name: str) -> Callable[[re.Match], str]:
        return lambda m: f"vision_model.stages.{int(m[1]) - 1}.{m[2]}.{name}.{m[3]}"

    def in_stem(name: str) -> Callable[[re.Match], str]:
        return lambda m: f"vision_model.stem.layers.{int(m[1]) - 1}.{name}.{m[2]}"

    pool = "vision_model.attention_pool."
    return [
        (p + r"conv([1-3])\.(weight)", rename(in_stem("conv"))),
        (p + r"bn([1-3])\." + NORM_TENSORS, rename(in_stem("norm"))),
        (block + r"conv1\.(weight)", rename(in_block("reduce.conv"))),
        (block + r"bn1\." + NORM_TENSORS, rename(in_block("reduce.norm"))),
        (block + r"conv2\.(weight)", rename(in_block("spatial.conv"))),
        (block + r"bn2\." + NORM_TENSORS, rename(in_block("spatial.norm"))),
        (block + r"conv3\.(weight)", rename(in_block("expand"))),
        (block + r"bn3\." + NORM_TENSORS, rename(in_block("expand_norm"))),
        (block + r"downsample\.0\.(weight)", rename(in_block("shortcut.conv"))),
        (block + r"downsample\.1\." + NORM_TENSORS, rename(in_block("shortcut.norm"))),
        (p + r"attnpool\.positional_embedding", rename(pool + "position_embedding")),
        (p + r"attnpool\.([qkv])_proj\.(weight|bias)", rename(pool + r"\1_proj.\2")),
        (p + r"attnpool\.c_proj\.(weight|bias)", rename(pool + r"out_proj.\1")),
    ]


def require_tensor(state_dict: dict[str, torch.Tensor], key: str, needed_for: str) -> torch.Tensor:
    """`state_dict[key]`, or a `ValueError` that says what the missing tensor was needed for."""
    if key not in state_dict:
        raise ValueError(f"The checkpoint has no {key!r}, needed to infer {needed_for}.")
    return state_dict[key]


def count_indexed(state_dict: dict[str, Any], pattern: str, what: str) -> int:
    """How many consecutive indices `0..n-1` the keys matching `pattern` (one `(\\d+)` group) use."""
    indices = {int(match[1]) for key in state_dict if (match := re.match(pattern, key))}
    if not indices or indices != set(range(len(indices))):
        raise ValueError(f"Cannot count {what}: keys matching {pattern!r} have indices {sorted(indices)}.")
    return len(indices)


def _square_side(rows: int, extra: int, key: str) -> int:
    side = int(round((rows - extra) ** 0.5))
    if side * side + extra != rows:
        raise ValueError(f"{key} has {rows} rows: not {extra} + a square grid of positions.")
    return side


def _heads(width: int, heads: int | None, what: str, option: str) -> int:
    """`heads`, or CLIP's rule `width // 64` when not given; it must divide `width`."""
    heads = width // 64 if heads is None else heads
    if heads < 1 or width % heads:
        raise ValueError(
            f"{what} has width {width}: {heads} attention heads do not divide it. Attention heads are not stored in "
            f"checkpoints and CLIP's rule width // 64 does not fit here: pass {option}."
        )
    return heads


def infer_clip_text_config(
    state_dict: dict[str, torch.Tensor], prefix: str, heads: int | None, hidden_act: str
) -> CLIPTextConfig:
    """The text tower's `CLIPTextConfig` from tensor shapes (heads default to `width // 64`, CLIP's rule)."""
    if any(key.startswith("text.") for key in state_dict):
        raise ValueError("The text tower is a Hugging Face model (text.*): only CLIP's text transformer is supported.")
    vocab_size, width = require_tensor(state_dict, f"{prefix}token_embedding.weight", "the text width").shape
    blocks = f"{prefix}transformer.resblocks."
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=require_tensor(state_dict, f"{blocks}0.mlp.c_fc.weight", "the text MLP width").shape[0],
        num_hidden_layers=count_indexed(state_dict, re.escape(blocks) + r"(\d+)\.", "text layers"),
        num_attention_heads=_heads(width, heads, "The text tower", "the text heads (text_heads)"),
        max_position_embeddings=require_tensor(state_dict, f"{prefix}positional_embedding", "the text length").shape[
            0
        ],
        projection_dim=require_tensor(state_dict, f"{prefix}text_projection", "the embedding size").shape[1],
        hidden_act=hidden_act,
    )


def _infer_vit_config(
    state_dict: dict[str, torch.Tensor], prefix: str, heads: int | None, hidden_act: str
) -> CLIPVisionConfig:
    """A ViT's `CLIPVisionConfig` from tensor shapes (heads default to `width // 64`, CLIP's rule)."""
    width, _, patch_size, _ = require_tensor(state_dict, f"{prefix}conv1.weight", "the ViT width").shape
    positions = require_tensor(state_dict, f"{prefix}positional_embedding", "the ViT grid").shape[0]
    blocks = f"{prefix}transformer.resblocks."
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=require_tensor(state_dict, f"{blocks}0.mlp.c_fc.weight", "the ViT MLP width").shape[0],
        num_hidden_layers=count_indexed(state_dict, re.escape(blocks) + r"(\d+)\.", "ViT layers"),
        num_attention_heads=_heads(width, heads, "The ViT", "the ViT heads (vision_heads)"),
        patch_size=patch_size,
        image_size=patch_size * _square_side(positions, 1, f"{prefix}positional_embedding"),
        projection_dim=require_tensor(state_dict, f"{prefix}proj", "the embedding size").shape[1],
        hidden_act=hidden_act,
    )


def _infer_resnet_config(
    state_dict: dict[str, torch.Tensor], prefix: str, heads: int | None, hidden_act: str
) -> DenseClipResNetConfig:
    """A ResNet's `DenseClipResNetConfig` from tensor shapes (attention-pool heads default to `32 * width // 64`,
    OpenAI's rule; `hidden_act` does not apply). A ResNet without the attention pool (the DenseCLIP authors'
    `CLIPResNet`) has no positional grid: `image_size` keeps its default."""
    width = require_tensor(state_dict, f"{prefix}conv3.weight", "the ResNet stem width").shape[0]
    grid_key = f"{prefix}attnpool.positional_embedding"
    grid = (
        {"image_size": 32 * _square_side(state_dict[grid_key].shape[0], 1, grid_key)} if grid_key in state_dict else {}
    )
    return DenseClipResNetConfig(
        layers=[
            count_indexed(state_dict, re.escape(f"{prefix}layer{stage}.") + r"(\d+)\.", f"blocks of stage {stage}")
            for stage in range(1, 5)
        ],
        width=width,
        attention_pool_heads=_heads(32 * width, heads, "The ResNet attention pool", "its heads (vision_heads)"),
        **grid,
    )


def _vit_shapes(vision_config: CLIPVisionConfig, projection_dim: int) -> dict[str, torch.Size]:
    return shapes_of(CLIPVisionModelWithProjection(vision_config))


def _resnet_shapes(vision_config: DenseClipResNetConfig, projection_dim: int) -> dict[str, torch.Size]:
    return shapes_of(DenseClipResNetVisionModel(vision_config, projection_dim, "bilinear"), prefix="vision_model.")


@dataclass(frozen=True)
class ClipImageTower:
    """One kind of CLIP image tower in OpenAI's layout: how to recognise it, read its config and convert its keys.

    `family` is the `DenseClipConfig.image_encoder_family` it becomes; `CLIP_IMAGE_TOWERS` holds one per family.
    """

    family: str
    marker: str  # a key, under the tower's prefix, that only this kind of tower has
    rules: Callable[[str], list[Rule]]  # the tower's prefix -> its rules (to the CLIP layout)
    infer_config: Callable[[dict[str, torch.Tensor], str, int | None, str], PreTrainedConfig]
    projection_key: str  # the tensor whose shape gives the embedding size D, and at which axis
    projection_axis: int
    shapes: Callable[[PreTrainedConfig, int], dict[str, torch.Size]]  # what `rules` must produce
    in_transformers_clip: bool  # whether transformers' `CLIPModel` can hold it

    def projection_dim(self, state_dict: dict[str, torch.Tensor], prefix: str) -> int:
        """Size of the joint embedding space on the image side."""
        key = prefix + self.projection_key
        return require_tensor(state_dict, key, "the embedding size").shape[self.projection_axis]


CLIP_IMAGE_TOWERS = {
    tower.family: tower
    for tower in (
        ClipImageTower(
            ClipViTSettings.name, "class_embedding", clip_vit_rules, _infer_vit_config, "proj", 1, _vit_shapes, True
        ),
        ClipImageTower(
            ClipResNetSettings.name,
            "layer1.0.conv1.weight",
            clip_resnet_rules,
            _infer_resnet_config,
            "attnpool.c_proj.weight",
            0,
            _resnet_shapes,
            False,
        ),
    )
}


def clip_image_tower(state_dict: dict[str, Any], prefix: str) -> ClipImageTower:
    """The kind of CLIP image tower under `prefix`, from its keys; a clear error for other towers."""
    for tower in CLIP_IMAGE_TOWERS.values():
        if prefix + tower.marker in state_dict:
            return tower
    if any(key.startswith(f"{prefix}trunk.") for key in state_dict):
        raise ValueError(
            f"The image tower under {prefix!r} is a timm model ({prefix}trunk.*): only CLIP's own ViT and ResNet "
            "towers are supported."
        )
    expected = " or ".join(f"{prefix}{tower.marker} ({tower.family})" for tower in CLIP_IMAGE_TOWERS.values())
    raise ValueError(f"No CLIP image tower found under {prefix!r}: expected {expected}.")


def clip_tower_rules(tower: ClipImageTower, vision_prefix: str, text_prefix: str) -> list[Rule]:
    """Rules for both CLIP towers: the image `tower` under `vision_prefix`, the text tower under `text_prefix`."""
    return [*tower.rules(vision_prefix), *clip_text_rules(text_prefix)]


def clip_tower_shapes(
    tower: ClipImageTower, text_config: CLIPTextConfig, vision_config: PreTrainedConfig
) -> dict[str, torch.Size]:
    """The tensors (CLIP layout) that `clip_tower_rules` must produce for these configs."""
    with torch.device("meta"):
        return {
            **shapes_of(CLIPTextModelWithProjection(text_config)),
            **tower.shapes(vision_config, text_config.projection_dim),
        }


# ---------------------------------------------------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------------------------------------------------


def _is_torchscript_archive(path: str | os.PathLike) -> bool:
    """TorchScript archives are zip files with compiled code (`<name>/code/...`) next to the pickled data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def load_checkpoint_file(path: str | os.PathLike) -> Any:
    """The object stored in a checkpoint file: safetensors; a `torch.save` pickle, read with `weights_only=True` (no
    code runs); or a TorchScript archive (OpenAI's `.pt` files), whose `state_dict()` is returned.

    TorchScript cannot be read with `weights_only`: `torch.jit.load` deserializes a TorchScript program, so only load
    archives you trust (OpenAI's download URLs embed the files' SHA256).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint file at {path!r}: pass the path of the downloaded .pth/.pt file.")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        if _is_torchscript_archive(path):
            return torch.jit.load(path, map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path!r} holds objects that torch.load(weights_only=True) does not read, so it is not loaded. If you "
            "trust the file, re-save just the tensors and plain data this converter needs, e.g. "
            "torch.save({'state_dict': checkpoint['state_dict'], 'meta': {'CLASSES': ..., 'PALETTE': ...}}, path). "
            f"PyTorch said: {error}"
        ) from error
    except (EOFError, KeyError, RuntimeError, SafetensorError, zipfile.BadZipFile) as error:
        raise OSError(
            f"{path!r} is not a readable checkpoint ({type(error).__name__}: {error}): it is probably truncated or "
            "not a PyTorch/safetensors file; download it again."
        ) from error


def unwrap_state_dict(checkpoint: Any, source: str) -> dict[str, torch.Tensor]:
    """A training checkpoint's `state_dict` (or the dict itself), without the `module.` prefix of (D)DP training."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a state dict.")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module.") :]: value for key, value in state_dict.items()}
    return dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------------
# OpenAI / OpenCLIP -> CLIP layout
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertedClip:
    """CLIP weights in this package's layout, with the configs inferred from their shapes.

    `state_dict` has transformers `CLIPModel` keys (`text_model.*`, `text_projection.weight`, `vision_model.*`,
    `visual_projection.weight` for a ViT, `logit_scale`); a ResNet image tower has `vision_model.*` keys of a
    `DenseClipResNetVisionModel` and no separate projection (it is the attention pool's output projection).
    OpenAI/OpenCLIP files hold no tokenizer: `tokenizer_path` is the CLIP tokenizer shipped with this package.
    """

    image_tower: ClipImageTower
    text_config: CLIPTextConfig
    vision_config: PreTrainedConfig
    projection_dim: int
    state_dict: dict[str, torch.Tensor]
    tokenizer_path: str = CLIP_TOKENIZER_PATH

    def clip_config(self) -> CLIPConfig:
        """The transformers `CLIPConfig` (image towers that transformers' `CLIPModel` has: ViT)."""
        if not self.image_tower.in_transformers_clip:
            raise ValueError(
                f"transformers' CLIPModel has no {self.image_tower.family} image tower: use from_clip_pretrained "
                "instead."
            )
        return CLIPConfig(
            text_config=self.text_config.to_dict(),
            vision_config=self.vision_config.to_dict(),
            projection_dim=self.projection_dim,
        )


def convert_clip_checkpoint(
    checkpoint: str | os.PathLike | dict[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
) -> ConvertedClip:
    """Converts OpenAI CLIP (`clip.load` files: TorchScript archives or state dicts) or OpenCLIP weights.

    Every hyperparameter comes from tensor shapes, except those checkpoints do not store:

    Args:
        checkpoint: A file (see `load_checkpoint_file`) or a state dict with OpenAI's keys (`visual.*`,
            `transformer.*`, `token_embedding.weight`, ..., possibly under `module.` or in a `{"state_dict": ...}`
            training checkpoint).
        vision_heads: ViT heads (default `width // 64`) or ResNet attention-pool heads (default `32 * width // 64`),
            OpenAI's rules, right for every released CLIP.
        text_heads: Text transformer heads (default `width // 64`).
        hidden_act: Activation of both transformers: `"quick_gelu"` (default; OpenAI, and OpenCLIP's `*-quickgelu`
            models) or `"gelu"` (other OpenCLIP models). Not stored in checkpoints.
    """
    source = "The CLIP state dict" if isinstance(checkpoint, dict) else f"CLIP checkpoint {os.fspath(checkpoint)!r}"
    raw = checkpoint if isinstance(checkpoint, dict) else load_checkpoint_file(checkpoint)
    state_dict = unwrap_state_dict(raw, source)
    hidden_act = hidden_act or "quick_gelu"
    tower = clip_image_tower(state_dict, "visual.")
    text_config = infer_clip_text_config(state_dict, "", text_heads, hidden_act)
    vision_config = tower.infer_config(state_dict, "visual.", vision_heads, hidden_act)
    projection_dim = tower.projection_dim(state_dict, "visual.")
    if projection_dim != text_config.projection_dim:
        raise ValueError(
            f"{source}: image embeddings have {projection_dim} channels, text embeddings {text_config.projection_dim}."
        )
    rules = [
        *clip_tower_rules(tower, "visual.", ""),
        (r"logit_scale", rename("logit_scale")),
        ("|".join(_OPENAI_METADATA_KEYS), drop),
    ]
    converted = convert_keys(state_dict, rules, source)
    converted = {key: value.float() if value.is_floating_point() else value for key, value in converted.items()}
    expected = {**clip_tower_shapes(tower, text_config, vision_config), "logit_scale": torch.Size([])}
    check_converted(converted, expected, source)
    return ConvertedClip(tower, text_config, vision_config, projection_dim, converted)
