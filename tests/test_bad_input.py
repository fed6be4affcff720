"""Bad input at the public entry points: a result, or a `ValueError` / `TypeError` / `OSError` whose message says
what is wrong, never an error from deep inside torch (issue 10, "Bad input").

A seeded property-style test draws a few hundred malformed inputs per entry point; targeted tests pin the known
cases (their message names the parameter) and `from_pretrained` on damaged folders."""

import json
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, tiny_config
from PIL import Image

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor
from denseclip_hf.modeling_denseclip import DenseClipSemanticSegmenterOutput

ALLOWED = (ValueError, TypeError, OSError)
CASES_PER_ENTRY_POINT = 100


def outcome(call: Callable[[], object]) -> str | None:
    """None when `call` gives a result or raises an allowed error with a message; otherwise what went wrong."""
    try:
        call()
    except ALLOWED as error:
        return None if str(error).strip() else f"{type(error).__name__} without a message"
    except Exception as error:  # noqa: BLE001 - any other error is what this test looks for
        return f"{type(error).__name__}: {str(error)[:200]}"
    return None


def random_pixels(rng: random.Random, channels: int) -> object:
    """A pixel input of random shape, dtype and content (mostly malformed)."""
    ndim = rng.choice([2, 3, 4, 4, 4, 5])
    sides = [rng.choice([0, 1, 15, 16, 31, 32, 33, 48, 64]) for _ in range(2)]
    batch = rng.choice([0, 1, 2])
    shape = {2: sides, 3: [channels, *sides], 4: [batch, rng.choice([1, channels, 4]), *sides]}.get(ndim, [1, 1, 3, 32, 32])
    dtype = rng.choice([torch.float32, torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64, torch.bool])
    tensor = (torch.rand(shape) * 255).to(dtype)
    if tensor.is_floating_point() and tensor.numel() and rng.random() < 0.2:
        tensor.view(-1)[0] = float(rng.choice(["nan", "inf"]))
    return rng.choice([tensor, tensor, tensor, tensor.numpy(), tensor.tolist() if tensor.numel() < 50 else None, "img"])


def random_labels(rng: random.Random, batch: int, num_labels: int) -> object:
    shape = rng.choice([(batch, 32, 32), (batch, 8, 8), (32, 32), (batch, 1, 32, 32), (batch + 1, 32, 32), (batch, 0, 4)])
    values = rng.choice([(0, num_labels), (-3, num_labels + 3), (250, 256), (num_labels, num_labels + 1)])
    labels = torch.randint(values[0], values[1], shape)
    return labels.to(rng.choice([torch.int64, torch.int64, torch.uint8, torch.int32, torch.float32]))


def random_size(rng: random.Random) -> object:
    return rng.choice([0, -1, 1, 16, 32, 40, 64, 7.5, "32", None, (32, 0), (48, 32), [64, 64], (32,), True])


def random_image(rng: random.Random) -> object:
    """A raw image for the processor: arrays of odd shapes / dtypes / ranges, PIL images of any mode, junk."""
    height, width = rng.choice([0, 1, 2, 5, 40]), rng.choice([0, 1, 3, 40])
    shape = rng.choice([(height, width), (height, width, rng.choice([1, 2, 3, 4, 5])), (3, height, width), (1, 1, height, width)])
    dtype = rng.choice([np.uint8, np.uint16, np.float32, np.float64, np.int64, bool])
    array = (np.random.default_rng(rng.randrange(1 << 30)).random(shape) * rng.choice([1, 255, 70000])).astype(dtype)
    if rng.random() < 0.3 and height and width:
        mode = rng.choice(["L", "RGB", "RGBA", "P", "I;16", "I", "F", "1", "LA", "CMYK"])
        return Image.new(mode, (width, height))
    return rng.choice([array, array, array, [array, array], [], None, 3, "not/a/file.png"])


@pytest.fixture(scope="module")
def models(tokenizer) -> dict[str, DenseClipForSemanticSegmentation]:
    from conftest import ENCODER_FAMILIES

    return {
        family: make_model(tiny_config(tokenizer, vision_config=settings.vision_config, test_crop_size=32, test_stride=16))
        for family, settings in ENCODER_FAMILIES.items()
    }


def test_generated_bad_input_gives_a_result_or_a_clear_error(models, tmp_path):
    rng = random.Random(10)
    processor = DenseClipImageProcessor(size=48, test_mode=rng.choice(["slide", "whole"]))
    failures, cases = [], 0

    def check(name: str, call: Callable[[], object]) -> None:
        nonlocal cases
        cases += 1
        problem = outcome(call)
        if problem:
            failures.append(f"{name}: {problem}")

    for _ in range(CASES_PER_ENTRY_POINT):
        model = models[rng.choice(list(models))]
        channels, num_labels = model.config.vision_config.num_channels, model.config.num_labels
        pixels = random_pixels(rng, channels)
        batch = pixels.shape[0] if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 else 1
        labels = random_labels(rng, batch, num_labels) if rng.random() < 0.5 else None
        mode = rng.choice([None, None, "plain", "slide", "whole", "tile", 3])
        check(f"forward(pixels {getattr(pixels, 'shape', pixels)!r}, labels, {mode})", lambda: model(pixels, labels=labels, test_mode=mode))
        good = torch.randn(1, channels, 32, 48)
        inputs = rng.choice([good, [good, torch.randn(1, channels, 64, 64)], [good, torch.randn(2, channels, 32, 32)], pixels, [], [good, "x"]])
        settings = dict(
            output_size=random_size(rng), flip=rng.choice([False, True, 1, "yes"]), mode=rng.choice([None, "slide", "whole", "x"]),
            crop_size=rng.choice([None, random_size(rng)]), stride=rng.choice([None, random_size(rng)]),
        )
        check(f"predict_probabilities({settings})", lambda: model.predict_probabilities(inputs, **settings))
        logits = torch.randn(rng.choice([1, 2]), num_labels, 8, 8)
        outputs = rng.choice([DenseClipSemanticSegmenterOutput(logits=logits), DenseClipSemanticSegmenterOutput(logits=logits[0]), None, {"logits": logits}])
        sizes = rng.choice([None, [random_size(rng)] * len(logits), torch.tensor([[0, 5]] * len(logits)), torch.full((len(logits), 2), 4.5), [(8, 8)] * 3, 5])
        check(f"post_process({sizes!r})", lambda: processor.post_process_semantic_segmentation(outputs, target_sizes=sizes))
        image = random_image(rng)
        label_map = rng.choice([None, None, np.zeros((40, 40), np.uint8), np.zeros((3, 3, 3), np.float32), "x"])
        kwargs = rng.choice([{}, {"return_tensors": "pt"}, {"size": random_size(rng)}, {"scale_ratios": rng.choice([[], [0.0], [-1.0], [0.5, 1.0]])}])
        check(f"processor({getattr(image, 'shape', image)!r}, {kwargs})", lambda: processor(image, segmentation_maps=label_map, **kwargs))
    assert cases >= 4 * CASES_PER_ENTRY_POINT
    assert not failures, f"{len(failures)} of {cases} cases failed unclearly:\n" + "\n".join(failures)
