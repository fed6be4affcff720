"""Loading DenseCLIP models: building one on CLIP weights (`from_clip_pretrained`, `from_backbone_pretrained`),
tokenizing its class names, reading folders of earlier versions, and clear errors for damaged folders.

Shipped with saved models as remote code (the model classes' loading methods use it). Reading OpenAI's / OpenCLIP's
checkpoint files needs the installed package (`denseclip_hf.checkpoint_conversion`).
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, CLIPConfig, PreTrainedConfig
from transformers.utils import logging

from .configuration_denseclip import DenseClipConfig, pyramid_backbone_config

logger = logging.get_logger(__name__)


def tokenize_class_names(class_names: list[str], tokenizer, length: int) -> list[list[int]]:
    """Token ids `[SOT, name..., EOT, 0...]` of each class name, `length` ids each (the authors' `tokenize`).

    Raises a `ValueError` naming the class when a name needs more than `length` tokens.
    """
    token_ids = []
    for label, name in enumerate(class_names):
        ids = tokenizer(name, add_special_tokens=True)["input_ids"]
        if len(ids) > length:
            raise ValueError(
                f"Class {label} ({name!r}) needs {len(ids)} tokens with its start and end tokens, more than "
                f"class_name_token_length={length}: shorten the name or pass class_name_token_length={len(ids)}."
            )
        token_ids.append(ids + [0] * (length - len(ids)))
    return token_ids


# CLIPModel checkpoint keys -> `DenseClipModel`'s CLIP towers. The converter writes ResNet towers with the same
# `vision_model.` prefix (a `DenseClipResNetVisionModel`), so one mapping serves both families.
CLIP_KEY_MAPPING = {
    r"^text_model\.": "text_encoder.text_model.",
    r"^text_projection\.": "text_encoder.text_projection.",
    r"^vision_model\.": "image_encoder.vision_model.",
    r"^visual_projection\.": "image_encoder.visual_projection.",
}
# `from_pretrained` arguments that say where and how to fetch files, shared by config, tokenizer and weights.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


@dataclass
class ClipSource:
    """Where `from_clip_pretrained` reads CLIP from: the towers' configs, how to load their weights, and the tokenizer
    that goes with them."""

    name: str
    text_config: PreTrainedConfig
    vision_config: PreTrainedConfig
    projection_dim: int
    weights: dict = field(repr=False)  # `from_pretrained` arguments that read the weights
    tokenizer_path: str
    tokenizer_kwargs: dict = field(default_factory=dict)


def resolve_clip_source(
    pretrained_model_name_or_path: str | os.PathLike,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
    **hub_kwargs,
) -> ClipSource:
    """Step 1: a transformers `CLIPModel` (Hub id or folder: its config, weights and tokenizer), or an OpenAI/OpenCLIP
    checkpoint file, converted in memory (`denseclip_hf.checkpoint_conversion.convert_clip_checkpoint`)."""
    name = os.fspath(pretrained_model_name_or_path)
    if os.path.isfile(name):
        clip = convert_clip_checkpoint_file(
            name, vision_heads=vision_heads, text_heads=text_heads, hidden_act=hidden_act
        )
        return ClipSource(
            name,
            clip.text_config,
            clip.vision_config,
            clip.projection_dim,
            weights={"pretrained_model_name_or_path": None, "state_dict": clip.state_dict},
            tokenizer_path=clip.tokenizer_path,
        )
    options = {"vision_heads": vision_heads, "text_heads": text_heads, "hidden_act": hidden_act}
    if any(value is not None for value in options.values()):
        raise ValueError(
            f"{sorted(option for option, value in options.items() if value is not None)} only apply to OpenAI or "
            f"OpenCLIP checkpoint files; {name!r} is read as a transformers CLIPModel, whose config already has them."
        )
    clip_config = CLIPConfig.from_pretrained(name, **hub_kwargs)
    return ClipSource(
        name,
        clip_config.text_config,
        clip_config.vision_config,
        clip_config.projection_dim,
        weights={"pretrained_model_name_or_path": name, **hub_kwargs},
        tokenizer_path=name,
        tokenizer_kwargs=hub_kwargs,
    )


def convert_clip_checkpoint_file(path: str, **options):
    """An OpenAI/OpenCLIP checkpoint file in this package's CLIP layout (a `ConvertedClip`): reading those formats is
    the installed package's job (`denseclip_hf.checkpoint_conversion`, not shipped with saved models), so this needs
    `denseclip_hf` (absent when this file runs as remote code)."""
    try:
        from denseclip_hf.checkpoint_conversion import convert_clip_checkpoint
    except ImportError as error:
        raise ImportError(
            f"{path!r} is an OpenAI/OpenCLIP checkpoint file: reading it needs the denseclip_hf package, which is not "
            "installed here (`pip install denseclip_hf`). Or convert it to a transformers CLIPModel folder where the "
            "package is installed (`python -m denseclip_hf.convert_clip_original_to_hf`) and pass the folder."
        ) from error
    return convert_clip_checkpoint(path, **options)


def load_clip_tokenizer(source: ClipSource, tokenizer=None):
    """Step 2a: `tokenizer`, or the CLIP tokenizer that goes with `source`; a `ValueError` when there is none with the
    text tower's vocabulary."""
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_path, **source.tokenizer_kwargs)
        except (OSError, ValueError) as error:
            tokenizer = error
    vocab_size = source.text_config.vocab_size
    # transformers 5 builds an empty tokenizer for a folder without vocabulary files: check the vocabulary size.
    if isinstance(tokenizer, Exception) or len(tokenizer) != vocab_size:
        found = tokenizer if isinstance(tokenizer, Exception) else f"a vocabulary of {len(tokenizer)} tokens"
        raise ValueError(
            f"No CLIP tokenizer with {vocab_size} tokens was found for {source.name!r} (got {found}); pass one with "
            "`tokenizer=CLIPTokenizer.from_pretrained(...)`."
        )
    return tokenizer


def tokenize_labels(id2label: dict[int, str], tokenizer, length: int) -> tuple[dict[int, str], list[list[int]]]:
    """Step 2b: `id2label` with int keys `0..K-1` (a `ValueError` otherwise) and the class names' token ids
    (`tokenize_class_names`)."""
    id2label = {int(label): name for label, name in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(f"id2label keys must be 0..{len(id2label) - 1}, got {sorted(id2label)}.")
    return id2label, tokenize_class_names([id2label[label] for label in range(len(id2label))], tokenizer, length)


def clip_denseclip_config(
    source: ClipSource,
    vision_config: PreTrainedConfig,
    id2label: dict[int, str],
    tokenizer,
    settings: dict,
    config_class: type[DenseClipConfig] = DenseClipConfig,
) -> DenseClipConfig:
    """The config (a `config_class`, the model class's) of a model built on a CLIP checkpoint: its text tower and
    projection width, `vision_config` (CLIP's own or a backbone's), the classes tokenized with the checkpoint's
    tokenizer (or `tokenizer`), and `settings`."""
    id2label, class_token_ids = tokenize_labels(
        id2label,
        load_clip_tokenizer(source, tokenizer),
        settings.get("class_name_token_length", DenseClipConfig.class_name_token_length),
    )
    return config_class(
        text_config=source.text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        projection_dim=source.projection_dim,
        id2label=id2label,
        class_token_ids=class_token_ids,
        **settings,
    )


def check_clip_towers(
    loading_info: dict, source: ClipSource, tower_prefixes: tuple[str, ...], unused_prefixes: tuple[str, ...] = ()
) -> None:
    """Step 4: a `ValueError` unless every CLIP tower tensor the model has (keys starting with `tower_prefixes`) was
    loaded and the source held nothing else (CLIP's `logit_scale` aside, `_keys_to_ignore_on_load_unexpected`) but
    the tensors under `unused_prefixes`, which the model leaves out on purpose (the text tower and image projection of
    the CLIP + Semantic FPN baseline; CLIP's image tower under any backbone)."""
    problems = {
        "missing": sorted(key for key in loading_info["missing_keys"] if key.startswith(tower_prefixes)),
        "unexpected": sorted(key for key in loading_info["unexpected_keys"] if not key.startswith(unused_prefixes)),
        "mismatched": sorted(str(key) for key in loading_info["mismatched_keys"]),
    }
    if any(problems.values()):
        details = "; ".join(f"{kind}: {keys}" for kind, keys in problems.items() if keys)
        raise ValueError(f"{source.name!r} is not a complete CLIP checkpoint ({details}).")


def load_on_clip(
    model_class: type,
    pretrained_model_name_or_path: str | os.PathLike,
    id2label: dict[int, str],
    tokenizer,
    kwargs: dict,
    *,
    backbone_name_or_path: str | os.PathLike | None = None,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str | None = None,
):
    """What `from_clip_pretrained` and `from_backbone_pretrained` do: builds `model_class` (a DenseCLIP model class) on
    the CLIP checkpoint `pretrained_model_name_or_path` with the classes `id2label`, its CLIP towers loaded bit-exactly
    and checked, every other tensor newly initialised. With `backbone_name_or_path`, the image encoder is that
    transformers backbone (its weights loaded) and only CLIP's text tower is read.

    `kwargs` holds `DenseClipConfig` settings, Hub arguments (used for every checkpoint), `from_pretrained`
    arguments (`output_loading_info=True` returns `(model, loading_info)`) and `position_embedding_size`: the input
    size in pixels the image encoder's positional embedding is resized to once loaded (`resize_position_embeddings`);
    default: the config class's `clip_position_embedding_size` (the detectors: the authors' 1344; segmentation:
    `None`, CLIP's grid kept).
    """
    position_embedding_size = kwargs.pop(
        "position_embedding_size", model_class.config_class.clip_position_embedding_size
    )
    hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
    config_settings = {setting.name for setting in fields(model_class.config_class)}
    settings = {key: kwargs.pop(key) for key in list(kwargs) if key in config_settings}
    output_loading_info = kwargs.pop("output_loading_info", False)
    source = resolve_clip_source(
        pretrained_model_name_or_path,
        vision_heads=vision_heads,
        text_heads=text_heads,
        hidden_act=hidden_act,
        **hub_kwargs,
    )
    key_mapping = CLIP_KEY_MAPPING
    vision_config = source.vision_config
    if backbone_name_or_path is not None:
        backbone_name_or_path = os.fspath(backbone_name_or_path)
        vision_config = pyramid_backbone_config(AutoConfig.from_pretrained(backbone_name_or_path, **hub_kwargs))
        key_mapping = {pattern: to for pattern, to in key_mapping.items() if to.startswith("text_encoder.")}
    config = clip_denseclip_config(source, vision_config, id2label, tokenizer, settings, model_class.config_class)
    key_mapping = model_class._base_model_key_mapping(key_mapping)
    with _without_load_report():
        model, info = model_class.from_pretrained(
            **source.weights, config=config, key_mapping=key_mapping, output_loading_info=True, **kwargs
        )
    towers = tuple(key_mapping.values())
    if backbone_name_or_path is not None:  # CLIP's image tower and projection are not read
        unused = ("",)
    elif not model.base_model.prompting.uses_text:  # the baseline: no text tower, no image projection
        unused = towers
    else:
        unused = ()
    check_clip_towers(info, source, towers, unused)
    if backbone_name_or_path is not None:
        model.base_model.image_encoder.load_backbone_weights(backbone_name_or_path, **hub_kwargs)
    if position_embedding_size is not None:
        model.resize_position_embeddings(position_embedding_size)
    logger.info(
        f"Loaded the CLIP towers ({', '.join(towers)}) from {source.name!r}"
        + (f" and the backbone from {backbone_name_or_path!r}" if backbone_name_or_path else "")
        + f"; {len(info['missing_keys'])} DenseCLIP tensors are newly initialised."
    )
    return (model, info) if output_loading_info else model


def declare_pipeline_support(model_class: type, task_model_names: dict[str, str]) -> None:
    """Lists `model_class` under its model type in transformers' table of a task's model class names
    (`MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES`, ...).

    transformers' pipelines check a model against those tables, which name transformers' own models only, and log "The
    model '...' is not supported for <task>" for every model registered with the Auto classes, ours included; the
    tables have no public registration. The Auto classes look registered models up before the tables, and iterate the
    tables only for model types transformers itself configures, so the entry changes nothing else.
    """
    task_model_names.setdefault(model_class.config_class.model_type, model_class.__name__)


def _is_not_a_load_report(record) -> bool:
    return "LOAD REPORT" not in record.getMessage()


@contextmanager
def _without_load_report():
    """Drops the "LOAD REPORT" warning that transformers' `from_pretrained` (5.x, logger `transformers.modeling_utils`)
    writes whenever a checkpoint lacks tensors of the model. `from_clip_pretrained` loads a CLIP checkpoint, which
    lacks every DenseCLIP tensor by design, and checks the CLIP towers itself (`check_clip_towers`); transformers has
    no public switch for the report."""
    loading_logger = logging.get_logger("transformers.modeling_utils")
    loading_logger.addFilter(_is_not_a_load_report)
    try:
        yield
    finally:
        loading_logger.removeFilter(_is_not_a_load_report)


# The key layout of folders saved by version 0.1.0 (one model: `image_encoder.*`, `text_encoder.*`,
# `context_embeddings`, `prompting.*`, `neck.*`, `decode_head.*`) -> this version's. `from_pretrained` applies it to
# every checkpoint (its patterns match none of this version's keys), so old folders load unchanged.
V0_1_0_BASE_MODEL_KEYS = {  # relative to DenseClipModel
    r"^(image_encoder|text_encoder|prompting)\.": r"\1.",
    r"^context_embeddings$": "prompting.context_embeddings",
}
V0_1_0_DECODER_KEYS = {r"^neck\.": "decoder.neck.", r"^decode_head\.": "decoder.head."}


@contextmanager
def clear_loading_errors(source: Any, kwargs: dict) -> Iterator[None]:
    """The entry check of `from_pretrained` on a damaged folder: a local folder without `config.json` (when no
    `config=` is given) is an `OSError` up front, instead of a model built from the default config failing on the
    weights' shapes; a damaged `model.safetensors` (truncated, empty) is an `OSError` and a `config.json` value of
    the wrong type a `TypeError`, both naming the file and the fix."""
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source) and kwargs.get("config") is None:
        subfolder = kwargs.get("subfolder") or ""
        if not os.path.isfile(os.path.join(source, subfolder, "config.json")):
            raise OSError(
                f"{os.path.join(source, subfolder)} has no config.json: save the model with `save_pretrained`, or "
                "pass `config=DenseClipConfig.from_pretrained(...)`."
            )
    try:
        yield
    except SafetensorError as error:
        raise OSError(
            f"The weights file (model.safetensors) of {source} is damaged ({error}): it was probably cut short by an "
            "interrupted save or download; save or download the model again."
        ) from error
    except StrictDataclassError as error:
        raise TypeError(
            f"config.json of {source} holds a value of the wrong type: {error} Fix the value in config.json (or "
            "save the config again with `DenseClipConfig.save_pretrained`)."
        ) from error
