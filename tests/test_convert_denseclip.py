"""The authors' segmentation checkpoints -> transformers folders that reproduce every stored output of their code.

The fixtures (`fixtures/official_denseclip_tiny_{vit,rn}.*`) were produced by running the authors' code (mmseg 0.30)
with random weights: the state dict, the inputs at two sizes, every intermediate output and the two losses.
"""

import argparse
import copy
import functools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FIXTURES, run_without_denseclip_hf
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForSemanticSegmentation, pipeline

from denseclip_hf import (
    DenseClipForSemanticSegmentation,
    DenseClipImageProcessor,
    DenseClipResNetConfig,
    convert_denseclip_checkpoint,
)
from denseclip_hf.convert_denseclip_original_to_hf import AUTHORS_RESNET_CROP, main

FAMILIES = ("vit", "rn")
INPUTS = {"expected": "inputs.pixel_values", "expected_alt": "inputs.pixel_values_alt"}
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@functools.cache
def fixture(family: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors and the json that describes them."""
    tensors = load_file(FIXTURES / f"official_denseclip_tiny_{family}.safetensors")
    return tensors, json.loads((FIXTURES / f"official_denseclip_tiny_{family}.json").read_text())


def authors_state_dict(family: str) -> dict[str, torch.Tensor]:
    tensors, _ = fixture(family)
    return {key.removeprefix("state_dict."): value for key, value in tensors.items() if key.startswith("state_dict.")}


def palette(num_classes: int) -> list[list[int]]:
    return [[10 * label, 255 - 10 * label, 7 * label] for label in range(num_classes)]


def authors_checkpoint(family: str) -> dict:
    """What mmcv's `save_checkpoint` writes: the state dict and `meta` with the classes and their colours."""
    names = fixture(family)[1]["class_names"]
    return {
        "state_dict": authors_state_dict(family),
        "meta": {"CLASSES": tuple(names), "PALETTE": palette(len(names))},
    }


def head_options(family: str) -> dict[str, int]:
    """The tiny fixtures' attention heads (not stored in checkpoints; for real CLIP widths they are width // 64)."""
    settings = fixture(family)[1]["hyperparameters"]
    return {
        "text_heads": settings["text_heads"],
        **({"vision_heads": settings["img_heads"]} if family == "vit" else {}),
    }


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, object]:
    """Each fixture saved as an authors' `.pth` and converted by the command's `main`."""
    folders = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"authors-{family}")
        torch.save(authors_checkpoint(family), root / "checkpoint.pth")
        options = [f"--{name}={value}" for name, value in head_options(family).items()]
        main(["--checkpoint", str(root / "checkpoint.pth"), "--output_dir", str(root / "converted"), *options])
        folders[family] = root / "converted"
    return folders


def reference_outputs(model: DenseClipForSemanticSegmentation, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor the fixtures store, computed by the converted model (intermediate ones caught with hooks)."""
    caught = {}
    hooks = [
        model.base_model.prompting.context_decoder.register_forward_hook(
            lambda m, i, out: caught.update(context_decoder=out)
        ),
        model.decoder.neck.register_forward_hook(lambda m, i, out: caught.update(neck=out)),
    ]
    with torch.no_grad():
        output = model(pixel_values, output_hidden_states=True, test_mode="plain")
        image = model.base_model.image_encoder(pixel_values)
        text_embeddings_pre = model.get_text_embeddings()
    for hook in hooks:
        hook.remove()
    seg_logits = F.interpolate(output.logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    return {
        **{f"backbone_features.{level}": feature for level, feature in enumerate(output.hidden_states[1:])},
        "global_embedding": image.global_embedding,
        "dense_embedding": image.dense_embedding,
        "text_embeddings_pre": text_embeddings_pre[None],
        "context_decoder_out": caught["context_decoder"],
        "text_embeddings": output.text_embeddings,
        "score_map": output.score_map,
        **{f"neck_outputs.{level}": feature for level, feature in enumerate(caught["neck"])},
        "decode_logits": output.logits,
        "seg_logits": seg_logits,
    }


@pytest.mark.parametrize("loader", ["from_pretrained", "auto"])
@pytest.mark.parametrize("prefix", list(INPUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_reproduces_every_stored_output(converted, family, prefix, loader):
    tensors, _ = fixture(family)
    load = DenseClipForSemanticSegmentation if loader == "from_pretrained" else AutoModelForSemanticSegmentation
    model = load.from_pretrained(converted[family]).eval()
    assert type(model) is DenseClipForSemanticSegmentation
    ours = reference_outputs(model, tensors[INPUTS[prefix]])
    # The text embeddings before prompting do not depend on the image: stored once.
    stored = {key: tensors.get(f"{prefix}.{key}", tensors.get(f"expected.{key}")) for key in ours}
    expected_keys = {key.split(".", 1)[1] for key in tensors if key.startswith(f"{prefix}.")}
    assert expected_keys <= set(ours), expected_keys - set(ours)
    for key, value in ours.items():
        torch.testing.assert_close(value, stored[key], **TOLERANCE, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("family", FAMILIES)
def test_reproduces_the_losses_with_mmseg_reduction(converted, family):
    tensors, _ = fixture(family)
    model = DenseClipForSemanticSegmentation.from_pretrained(converted[family], loss_reduction="mean_all_pixels")
    labels = tensors["inputs.gt_semantic_seg"][:, 0]
    assert (labels == 255).any(), "the fixture should exercise ignored pixels"
    with torch.no_grad():
        output = model.eval()(tensors["inputs.pixel_values"], labels=labels)
    # mmseg stores the losses already multiplied by their weights (1.0 and 0.4).
    torch.testing.assert_close(output.decode_loss, tensors["expected_loss.decode.loss_ce"], **TOLERANCE)
    torch.testing.assert_close(
        model.config.identity_loss_weight * output.identity_loss,
        tensors["expected_loss.aux_identity.loss_ce"],
        **TOLERANCE,
    )
    total = tensors["expected_loss.decode.loss_ce"] + tensors["expected_loss.aux_identity.loss_ce"]
    torch.testing.assert_close(output.loss, total, **TOLERANCE)


@pytest.mark.parametrize("family", FAMILIES)
def test_infers_every_hyperparameter(converted, family):
    tensors, description = fixture(family)
    settings = description["hyperparameters"]
    config = DenseClipForSemanticSegmentation.from_pretrained(converted[family]).config
    assert config.id2label == dict(enumerate(description["class_names"]))
    assert config.class_token_ids == tensors["inputs.class_token_ids"].tolist()
    assert config.palette == palette(settings["num_classes"])
    assert (config.num_context_tokens, config.class_name_token_length) == (settings["n_ctx"], 5)
    assert config.projection_dim == settings["embed_dim"]
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (
        settings["text_width"],
        settings["text_layers"],
        settings["text_heads"],
    )
    assert text.max_position_embeddings == settings["text_context_length"]
    assert (config.context_decoder_layers, config.context_decoder_hidden_size, config.context_decoder_heads) == (
        settings["cd_layers"],
        settings["cd_width"],
        settings["cd_heads"],
    )
    assert (config.fpn_channels, config.decode_head_channels) == (settings["neck_channels"], settings["head_channels"])
    assert config.score_map_level == settings["score_concat_index"]
    assert config.loss_reduction == "mean_non_ignored"  # the package default unless --loss_reduction says otherwise
    vision = config.vision_config
    if family == "vit":
        assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size) == (
            settings["img_width"],
            settings["img_layers"],
            settings["img_heads"],
            settings["patch_size"],
        )
        assert vision.image_size == settings["input_resolution"]
        assert config.vision_feature_layers == settings["out_indices"]
    else:
        assert isinstance(vision, DenseClipResNetConfig)
        assert (vision.layers, vision.width) == (settings["rn_layers"], settings["rn_width"])
        assert (vision.attention_pool_heads, vision.image_size) == (32, settings["input_resolution"])
        assert config.vision_feature_layers is None
    processor = DenseClipImageProcessor.from_pretrained(converted[family])
    assert processor.size == {"shortest_edge": settings["input_resolution"], "longest_edge": 2048}


def test_command_converts_a_bare_state_dict_with_class_names(converted, tmp_path):
    names = fixture("rn")[1]["class_names"]
    torch.save(authors_state_dict("rn"), tmp_path / "bare.pth")
    (tmp_path / "names.json").write_text(json.dumps(names))
    command = [sys.executable, "-m", "denseclip_hf.convert_denseclip_original_to_hf", "--checkpoint"]
    command += [str(tmp_path / "bare.pth"), "--output_dir", str(tmp_path / "out"), "--class_names"]
    result = subprocess.run(
        [*command, str(tmp_path / "names.json"), "--text_heads=2", "--loss_reduction=mean_all_pixels"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resnet, 5 classes, score map on level 3" in result.stdout
    model = DenseClipForSemanticSegmentation.from_pretrained(tmp_path / "out")
    reference = DenseClipForSemanticSegmentation.from_pretrained(converted["rn"])
    assert model.config.palette is None and model.config.loss_reduction == "mean_all_pixels"
    assert model.config.id2label == reference.config.id2label
    for key, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], tensor, rtol=0, atol=0, msg=key)


def test_pipeline_runs_on_a_converted_folder(converted):
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (50, 70, 3), dtype=np.uint8))
    segments = pipeline("image-segmentation", model=str(converted["rn"]))(image)
    assert segments and {segment["label"] for segment in segments} <= set(fixture("rn")[1]["class_names"])
    assert all(segment["mask"].size == image.size for segment in segments)


def test_converted_folder_loads_without_the_package(converted, tmp_path):
    """The ResNet sub-config resolves from config.json in the copied code alone (trust_remote_code=True)."""
    tensors, _ = fixture("rn")
    torch.save(
        {"x": tensors["inputs.pixel_values_alt"], "y": tensors["expected_alt.decode_logits"]}, tmp_path / "io.pt"
    )
    run_without_denseclip_hf(
        f"""
        import torch
        from transformers import AutoModelForSemanticSegmentation

        model = AutoModelForSemanticSegmentation.from_pretrained({str(converted["rn"])!r}, trust_remote_code=True)
        assert "denseclip_hf" not in sys.modules
        assert type(model.config.vision_config).__name__ == "DenseClipResNetConfig"
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            logits = model.eval()(io["x"], test_mode="plain").logits
            torch.testing.assert_close(logits, io["y"], atol=1e-4, rtol=1e-4)
        """,
        tmp_path,
    )


def test_unknown_and_missing_keys_are_listed():
    checkpoint = authors_checkpoint("rn")
    checkpoint["state_dict"]["backbone.layer5.0.conv1.weight"] = torch.zeros(1)
    checkpoint["state_dict"]["decode_head.extra_head.bias"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 unknown key\(s\).*backbone\.layer5\.0\.conv1\.weight.*extra_head"):
        convert_denseclip_checkpoint(checkpoint, text_heads=2)

    checkpoint = authors_checkpoint("rn")
    del checkpoint["state_dict"]["neck.fpn_convs.1.conv.bias"]
    del checkpoint["state_dict"]["backbone.attnpool.q_proj.bias"]
    with pytest.raises(
        ValueError, match=r"missing tensors for 2 key\(s\).*neck\.fpn_convs\.1.*attention_pool\.q_proj\.bias"
    ):
        convert_denseclip_checkpoint(checkpoint, text_heads=2)

    checkpoint = authors_checkpoint("rn")
    del checkpoint["state_dict"]["decode_head.conv_seg.weight"]
    with pytest.raises(ValueError, match=r"no 'decode_head\.conv_seg\.weight', needed to infer the number of classes"):
        convert_denseclip_checkpoint(checkpoint, text_heads=2)


def test_wrong_shapes_class_names_and_heads_are_explained():
    checkpoint = authors_checkpoint("rn")
    checkpoint["state_dict"]["gamma"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"wrong shapes.*prompting\.gamma: \(7,\) instead of \(32,\)"):
        convert_denseclip_checkpoint(checkpoint, text_heads=2)
    with pytest.raises(ValueError, match="Got 2 class names for a checkpoint with 5 classes"):
        convert_denseclip_checkpoint(authors_checkpoint("rn"), ["sky", "tree"], text_heads=2)
    with pytest.raises(ValueError, match=r"no meta\['CLASSES'\]: pass the class names"):
        convert_denseclip_checkpoint(authors_state_dict("rn"), text_heads=2)
    with pytest.raises(ValueError, match=r"The ViT has width 48: 0 attention heads.*vision_heads"):
        convert_denseclip_checkpoint(authors_checkpoint("vit"), text_heads=2)
    with pytest.raises(ValueError, match=r"Class 0 \('a very long class name'\) needs 7 tokens"):
        convert_denseclip_checkpoint(authors_checkpoint("rn"), ["a very long class name"] + ["x"] * 4, text_heads=2)


def test_pickles_that_need_code_are_refused(tmp_path):
    """`torch.load(weights_only=True)`: a checkpoint holding arbitrary objects is not unpickled."""
    checkpoint = {**authors_checkpoint("rn"), "config": argparse.Namespace(lr=0.1)}
    torch.save(checkpoint, tmp_path / "with-objects.pth")
    with pytest.raises(ValueError, match=r"does not read, so it is not loaded.*re-save just the tensors"):
        convert_denseclip_checkpoint(tmp_path / "with-objects.pth", text_heads=2)


def baseline_state_dict(family: str, score_map_level: int) -> dict[str, torch.Tensor]:
    """An authors' CLIP + Semantic FPN baseline (`fpn_clip*`) made from a DenseCLIP fixture: no text encoder,
    contexts, context decoder, gamma or attention pool, and an FPN whose score-map level reads the pyramid alone (the
    score map's channels, concatenated last, cut from its lateral convolution)."""
    without_text = ("text_encoder.", "context_decoder.", "contexts", "gamma", "backbone.attnpool.")
    state_dict = {key: value for key, value in authors_state_dict(family).items() if not key.startswith(without_text)}
    lateral = f"neck.lateral_convs.{score_map_level}.conv.weight"
    num_classes = len(fixture(family)[1]["class_names"])
    state_dict[lateral] = state_dict[lateral][:, :-num_classes].clone()
    return state_dict


@pytest.mark.parametrize("family", FAMILIES)
def test_converts_the_clip_semantic_fpn_baseline(converted, family):
    """A checkpoint without text becomes prompting_type="none" with every tensor used (strict load), and its logits
    are those of the converted DenseCLIP's image encoder and decoder with the same (cut) FPN weights."""
    denseclip = DenseClipForSemanticSegmentation.from_pretrained(converted[family]).eval()
    level = denseclip.config.score_map_level
    state_dict = baseline_state_dict(family, level)
    names = fixture(family)[1]["class_names"]
    options = {key: value for key, value in head_options(family).items() if key != "text_heads"}
    model = convert_denseclip_checkpoint(state_dict, names, **options)
    assert model.config.prompting_type == "none" and model.base_model.text_encoder is None
    # The ResNet stores no positional grid without its attention pool: the crop is the authors' (512).
    crop = AUTHORS_RESNET_CROP if family == "rn" else denseclip.config.test_crop_size
    assert model.config.test_crop_size == model.config.vision_config.image_size == crop
    assert not any("attention_pool" in key or "visual_projection" in key for key in model.state_dict())
    decoder = copy.deepcopy(denseclip.decoder)
    decoder.neck.lateral_convs[level].weight = torch.nn.Parameter(
        denseclip.decoder.neck.lateral_convs[level].weight[:, : -len(names)]
    )
    pixel_values = fixture(family)[0][INPUTS["expected"]]
    with torch.no_grad():
        expected = decoder(denseclip.base_model.image_encoder(pixel_values).pyramid)
        output = model(pixel_values, test_mode="plain")
    assert output.score_map is None and output.text_embeddings is None
    torch.testing.assert_close(output.logits, expected, **TOLERANCE)
