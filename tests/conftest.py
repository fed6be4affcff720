"""Shared fixtures: tiny random CLIP / DenseCLIP configs, the real CLIP tokenizer shipped with the package, and a
Hugging Face Hub on loopback (tests/hub_server.py)."""

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from hub_server import ORGANIZATION, HubServer

# huggingface_hub reads these once, when it is first imported: the loopback Hub serves the whole session, and its
# clients (this process and subprocesses) download into a cache folder of its own.
os.environ.update((HUB := HubServer.start()).environment())

import datasets
import huggingface_hub.constants
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from clip_reference import randomize_batch_norms
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

import denseclip_hf
from denseclip_hf import DenseClipConfig, DenseClipForSemanticSegmentation, tokenize_class_names
from denseclip_hf.training.arguments import parse_training_args
from denseclip_hf.training.checkpointing import write_manifest
from denseclip_hf.training.loop import train

FIXTURES = Path(__file__).parent / "fixtures"
CLASS_NAMES = ["wall", "building", "sky", "traffic light"]

TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=64, patch_size=16
)
TINY_RESNET = dict(layers=[1, 2, 1, 1], width=8, attention_pool_heads=4, image_size=64)


@dataclass(frozen=True)
class EncoderFamily:
    """An image encoder family in the tiny test size, and what the tests expect of it (written out here, not read
    from the package)."""

    vision_config: dict
    score_map_stride: int  # z's stride: the ViT patch size, 32 for a ResNet
    score_map_level: int  # the default pyramid level of the score map (its own stride)
    pyramid_channels: list[int]  # the image encoder's 4 levels
    bad_size: tuple[int, int]  # a (height, width) the encoder rejects...
    bad_size_error: str  # ...with this message


ENCODER_FAMILIES = {
    "vit": EncoderFamily(TINY_VISION, 16, 2, [32, 32, 32, 32], (60, 64), "multiples of the patch size 16"),
    "resnet": EncoderFamily(
        {"model_type": "denseclip_resnet_vision", **TINY_RESNET}, 32, 3, [32, 64, 128, 256], (64, 16), "at least 32"
    ),
}


@pytest.fixture(scope="session")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(denseclip_hf.CLIP_TOKENIZER_PATH)


def tiny_config(tokenizer: CLIPTokenizer, class_names: list[str] = CLASS_NAMES, **overrides) -> DenseClipConfig:
    """A DenseCLIP config small enough for CPU tests: ViT width 32 / 4 layers, text width 16 / 2 layers."""
    settings = dict(
        text_config=TINY_TEXT,
        vision_config=TINY_VISION,
        projection_dim=24,
        num_context_tokens=4,
        context_decoder_layers=2,
        context_decoder_hidden_size=16,
        context_decoder_heads=2,
        fpn_channels=16,
        decode_head_channels=16,
        id2label=dict(enumerate(class_names)),
        class_token_ids=tokenize_class_names(class_names, tokenizer, overrides.get("class_name_token_length", 5)),
    )
    settings.update(overrides)
    return DenseClipConfig(**settings)


@pytest.fixture
def config(tokenizer) -> DenseClipConfig:
    return tiny_config(tokenizer)


@pytest.fixture(params=list(ENCODER_FAMILIES))
def family(request) -> str:
    """Each image encoder family in turn (`ENCODER_FAMILIES`)."""
    return request.param


@pytest.fixture
def family_config(tokenizer, family) -> DenseClipConfig:
    """The tiny config of each image encoder family in turn."""
    return tiny_config(tokenizer, vision_config=ENCODER_FAMILIES[family].vision_config)


def make_model(config: DenseClipConfig, seed: int = 0) -> DenseClipForSemanticSegmentation:
    """A random model in eval mode, its BatchNorms randomized too (so that none is an identity)."""
    torch.manual_seed(seed)
    model = DenseClipForSemanticSegmentation(config).eval()
    randomize_batch_norms(model, seed)
    return model


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny `CLIPModel` checkpoint with the CLIP tokenizer, saved like a Hub repository."""
    torch.manual_seed(0)
    clip = CLIPModel(CLIPConfig(text_config=TINY_TEXT, vision_config=TINY_VISION, projection_dim=24))
    path = tmp_path_factory.mktemp("tiny-clip")
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """A `datasets` cache of the test's own (`datasets.config.HF_DATASETS_CACHE`, read when a dataset is built)."""
    folder = tmp_path / "datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", folder)
    return folder


def reset_accelerate() -> None:
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_in_process(argv: list[str]) -> dict:
    """`examples/train_seg.py argv` in this process, with a fresh Accelerate state."""
    reset_accelerate()
    try:
        return train(parse_training_args(argv))
    finally:
        reset_accelerate()


def fake_checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    """A `step_N` training checkpoint folder with two small files, with its manifest unless `complete=False`."""
    folder = output_dir / "checkpoints" / f"step_{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    (folder / "random_states_0.pkl").write_bytes(b"rng")
    if complete:
        write_manifest(folder, step)
    return folder


def write_pair(image_path: Path, label_path: Path, value: int = 1) -> None:
    """An 8x6 RGB image and its `L` label map of constant `value`, with their folders."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (10, 20, 30)).save(image_path)
    Image.new("L", (8, 6), value).save(label_path)


@pytest.fixture(scope="session")
def hub() -> HubServer:
    assert huggingface_hub.constants.ENDPOINT == HUB.url, "huggingface_hub was imported before conftest.py set it up"
    return HUB


@pytest.fixture
def hub_repo_id(tmp_path) -> str:
    """A repository id of its own for each test (the loopback Hub lives as long as the session)."""
    return f"{ORGANIZATION}/{tmp_path.name}"


def run_without_denseclip_hf(script: str, tmp_path: Path, online: bool = False) -> subprocess.CompletedProcess:
    """Runs `script` in a fresh Python where `import denseclip_hf` fails (as for a Hub user without the package);
    offline unless `online` (then it reaches the loopback Hub only)."""
    blocker = textwrap.dedent(
        """
        import sys

        class _BlockDenseClip:
            def find_spec(self, name, path=None, target=None):
                if name == "denseclip_hf" or name.startswith("denseclip_hf."):
                    raise ImportError("denseclip_hf is not installed here")

        sys.meta_path.insert(0, _BlockDenseClip())
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "0" if online else "1"}
    result = subprocess.run(
        [sys.executable, "-c", blocker + textwrap.dedent(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result
