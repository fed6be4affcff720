"""CLIP weights in OpenAI's / OpenCLIP's format -> transformers `CLIPModel` (ViT) and `from_clip_pretrained` (ViT and
ResNet), checked against an independent re-implementation of OpenAI's CLIP (`clip_reference.py`)."""

import warnings

import pytest
import torch
from clip_reference import CLIP, randomize_batch_norms
from transformers import CLIPModel, CLIPTokenizer

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipResNetConfig, convert_clip_checkpoint
from denseclip_hf.convert_clip_original_to_hf import main

TEXT = dict(context_length=16, vocab_size=49408, text_width=16, text_heads=2, text_layers=2)
HEADS = dict(vision_heads=4, text_heads=2)  # tiny widths: OpenAI's width // 64 rule does not apply
TOLERANCE = dict(atol=1e-5, rtol=1e-5)
# OpenAI's archives are TorchScript, which torch 2.13 deprecates (it still reads and writes them).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def reference_clip(family: str) -> CLIP:
    torch.manual_seed(0 if family == "vit" else 1)
    if family == "vit":
        model = CLIP(24, 64, 4, 32, 4, vision_patch_size=16, **TEXT)
    else:
        model = CLIP(24, 64, [1, 2, 1, 1], 8, 4, **TEXT)
        randomize_batch_norms(model)
    return model.eval()


@pytest.fixture(scope="module")
def references() -> dict[str, CLIP]:
    return {family: reference_clip(family) for family in ("vit", "rn")}


@pytest.fixture(scope="module")
def checkpoint_files(references, tmp_path_factory) -> dict[tuple[str, str], str]:
    """Each reference as OpenAI's TorchScript archive, a plain state dict, and an OpenCLIP training checkpoint."""
    root = tmp_path_factory.mktemp("clip-checkpoints")
    files = {}
    images, text = torch.randn(1, 3, 64, 64), torch.tensor([[49406, 320, 49407] + [0] * 13])
    for family, reference in references.items():
        with warnings.catch_warnings():  # TorchScript tracing warnings
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(reference, (images, text), check_trace=False)
        files[family, "torchscript"] = str(root / f"{family}-jit.pt")
        torch.jit.save(traced, files[family, "torchscript"])
        files[family, "state_dict"] = str(root / f"{family}.pt")
        torch.save(reference.state_dict(), files[family, "state_dict"])
        files[family, "openclip"] = str(root / f"{family}-openclip.pt")
        wrapped = {f"module.{key}": value for key, value in reference.state_dict().items()}
        torch.save({"epoch": 3, "state_dict": wrapped}, files[family, "openclip"])
    return files


def class_token_ids(tokenizer: CLIPTokenizer, names: list[str], length: int) -> torch.Tensor:
    ids = [tokenizer(name)["input_ids"] for name in names]
    return torch.tensor([row + [0] * (length - len(row)) for row in ids])


@pytest.mark.parametrize("layout", ["torchscript", "state_dict", "openclip"])
def test_vit_becomes_a_clipmodel_with_the_same_embeddings(references, checkpoint_files, tokenizer, layout):
    clip = convert_clip_checkpoint(checkpoint_files["vit", layout], **HEADS)
    model = CLIPModel(clip.clip_config()).eval()
    model.load_state_dict(clip.state_dict, strict=True)
    assert clip.vision_config.image_size == 64 and clip.vision_config.patch_size == 16
    pixel_values = torch.randn(2, 3, 64, 64)
    input_ids = class_token_ids(tokenizer, ["cat", "traffic light"], TEXT["context_length"])
    reference = references["vit"]
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_image_features(pixel_values=pixel_values).pooler_output,
            reference.visual(pixel_values),
            **TOLERANCE,
        )
        torch.testing.assert_close(
            model.get_text_features(input_ids=input_ids).pooler_output, reference.encode_text(input_ids), **TOLERANCE
        )
    torch.testing.assert_close(model.logit_scale, reference.logit_scale)


def test_command_writes_a_clipmodel_folder_that_from_clip_pretrained_reads(references, checkpoint_files, tmp_path):
    options = ["--vision_heads=4", "--text_heads=2"]
    main(["--checkpoint", checkpoint_files["vit", "torchscript"], "--output_dir", str(tmp_path), *options])
    pixel_values = torch.randn(1, 3, 64, 64)
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(tmp_path, id2label={0: "cat"})
    with torch.no_grad():
        torch.testing.assert_close(
            model.base_model.image_encoder(pixel_values).global_embedding,
            references["vit"].visual(pixel_values),
            **TOLERANCE,
        )
    with pytest.raises(SystemExit):
        main(["--checkpoint", checkpoint_files["rn", "state_dict"], "--output_dir", str(tmp_path / "rn"), *options])


@pytest.mark.parametrize("layout", ["torchscript", "openclip"])
def test_resnet_from_clip_pretrained_matches_the_reference(references, checkpoint_files, tokenizer, layout):
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        checkpoint_files["rn", layout],
        id2label={0: "cat", 1: "traffic light"},
        num_context_tokens=0,  # the text input is then exactly CLIP's "[SOT] name [EOT]"
        class_name_token_length=TEXT["context_length"],
        **HEADS,
    ).eval()
    vision = model.config.vision_config
    assert isinstance(vision, DenseClipResNetConfig) and model.config.score_map_level == 3
    assert (vision.layers, vision.width, vision.image_size, vision.attention_pool_heads) == ([1, 2, 1, 1], 8, 64, 4)
    reference = references["rn"]
    assert (
        model.config.class_token_ids
        == class_token_ids(tokenizer, ["cat", "traffic light"], TEXT["context_length"]).tolist()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.get_text_embeddings(), reference.encode_text(model.base_model.class_token_ids), **TOLERANCE
        )
        for size in [(64, 64), (96, 64), (80, 48)]:  # the native grid, then resized positions
            pixel_values = torch.randn(2, 3, *size)
            ours = model.base_model.image_encoder(pixel_values)
            features, global_embedding, dense_embedding = reference.visual(pixel_values)
            for level, (mine, theirs) in enumerate(zip(ours.pyramid, features, strict=True)):
                torch.testing.assert_close(mine, theirs, **TOLERANCE, msg=f"stage {level}")
            torch.testing.assert_close(ours.global_embedding, global_embedding, **TOLERANCE)
            torch.testing.assert_close(ours.dense_embedding, dense_embedding, **TOLERANCE)


def test_vit_file_in_from_clip_pretrained_uses_the_packaged_tokenizer(references, checkpoint_files, tokenizer):
    model = DenseClipForSemanticSegmentation.from_clip_pretrained(
        checkpoint_files["vit", "state_dict"], id2label={0: "wall", 1: "sky"}, **HEADS
    ).eval()
    assert model.config.class_token_ids == class_token_ids(tokenizer, ["wall", "sky"], 5).tolist()
    assert model.config.score_map_level == 2 and model.config.vision_config.hidden_act == "quick_gelu"
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.base_model.image_encoder(pixel_values).global_embedding,
            references["vit"].visual(pixel_values),
            **TOLERANCE,
        )


def test_settings_that_checkpoints_do_not_store(references):
    state_dict = references["vit"].state_dict()
    clip = convert_clip_checkpoint(state_dict, hidden_act="gelu", **HEADS)
    assert clip.text_config.hidden_act == clip.vision_config.hidden_act == "gelu"
    assert (clip.vision_config.num_attention_heads, clip.text_config.num_attention_heads) == (4, 2)
    with pytest.raises(ValueError, match=r"The ViT has width 32: 0 attention heads.*vision_heads"):
        convert_clip_checkpoint(state_dict, text_heads=2)
    with pytest.raises(ValueError, match=r"The text tower has width 16: 0 attention heads.*text_heads"):
        convert_clip_checkpoint(state_dict, vision_heads=4)
    resnet = convert_clip_checkpoint(references["rn"].state_dict(), text_heads=2)
    assert resnet.vision_config.attention_pool_heads == 4  # OpenAI's rule: 32 * width // 64


def test_unknown_missing_and_foreign_towers_are_errors(references, tiny_clip_dir):
    state_dict = references["rn"].state_dict()
    with pytest.raises(ValueError, match=r"1 unknown key\(s\).*'visual\.layer2\.0\.extra\.weight'"):
        convert_clip_checkpoint({**state_dict, "visual.layer2.0.extra.weight": torch.zeros(1)}, **HEADS)
    incomplete = {key: value for key, value in state_dict.items() if key not in ("logit_scale", "visual.bn2.bias")}
    with pytest.raises(
        ValueError, match=r"missing tensors for 2 key\(s\).*'logit_scale'.*stem\.layers\.1\.norm\.bias"
    ):
        convert_clip_checkpoint(incomplete, **HEADS)
    timm = {key.replace("visual.", "visual.trunk."): value for key, value in state_dict.items()}
    with pytest.raises(ValueError, match=r"timm model \(visual\.trunk\.\*\)"):
        convert_clip_checkpoint(timm, **HEADS)
    with pytest.raises(ValueError, match=r"\['vision_heads'\] only apply to OpenAI or OpenCLIP checkpoint files"):
        DenseClipForSemanticSegmentation.from_clip_pretrained(tiny_clip_dir, id2label={0: "cat"}, vision_heads=4)
