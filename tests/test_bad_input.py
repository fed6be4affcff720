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


def outcome(function: Callable, *args, **kwargs) -> str:
    """ "result" or "clear error" when `function(*args, **kwargs)` gives a result or raises an allowed error with a
    message; otherwise what went wrong."""
    try:
        function(*args, **kwargs)
    except ALLOWED as error:
        return "clear error" if str(error).strip() else f"{type(error).__name__} without a message"
    except Exception as error:  # noqa: BLE001 - any other error is what this test looks for
        return f"{type(error).__name__}: {str(error)[:200]}"
    return "result"


def random_pixels(rng: random.Random, channels: int) -> object:
    """A pixel input of random shape, dtype and content (mostly malformed)."""
    if rng.random() < 0.3:
        return torch.randn(rng.choice([1, 2]), channels, rng.choice([32, 48, 64]), rng.choice([32, 64]))
    ndim = rng.choice([2, 3, 4, 4, 4, 5])
    sides = [rng.choice([0, 1, 15, 16, 31, 32, 33, 48, 64]) for _ in range(2)]
    batch = rng.choice([0, 1, 2])
    shape = {2: sides, 3: [channels, *sides], 4: [batch, rng.choice([1, channels, 4]), *sides]}.get(
        ndim, [1, 1, 3, 32, 32]
    )
    dtype = rng.choice(
        [torch.float32, torch.float32, torch.float64, torch.float16, torch.uint8, torch.int64, torch.bool]
    )
    tensor = (torch.rand(shape) * 255).to(dtype)
    if tensor.is_floating_point() and tensor.numel() and rng.random() < 0.2:
        tensor.view(-1)[0] = float(rng.choice(["nan", "inf"]))
    return rng.choice(
        [tensor, tensor, tensor, tensor.numpy(), tensor.tolist() if tensor.numel() < 50 else None, "img"]
    )


def random_labels(rng: random.Random, batch: int, num_labels: int) -> object:
    shape = rng.choice(
        [(batch, 32, 32), (batch, 8, 8), (32, 32), (batch, 1, 32, 32), (batch + 1, 32, 32), (batch, 0, 4)]
    )
    values = rng.choice([(0, num_labels), (-3, num_labels + 3), (250, 256), (num_labels, num_labels + 1)])
    labels = torch.randint(values[0], values[1], shape)
    return labels.to(rng.choice([torch.int64, torch.int64, torch.uint8, torch.int32, torch.float32]))


def random_size(rng: random.Random) -> object:
    return rng.choice([0, -1, 1, 16, 32, 40, 64, 7.5, "32", None, (32, 0), (48, 32), [64, 64], (32,), True])


def random_image(rng: random.Random) -> object:
    """A raw image for the processor: arrays of odd shapes / dtypes / ranges, PIL images of any mode, junk."""
    height, width = rng.choice([0, 1, 2, 5, 40]), rng.choice([0, 1, 3, 40])
    shape = rng.choice(
        [(height, width), (height, width, rng.choice([1, 2, 3, 4, 5])), (3, height, width), (1, 1, height, width)]
    )
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
        family: make_model(
            tiny_config(tokenizer, vision_config=settings.vision_config, test_crop_size=32, test_stride=16)
        )
        for family, settings in ENCODER_FAMILIES.items()
    }


def test_generated_bad_input_gives_a_result_or_a_clear_error(models, tmp_path):
    rng = random.Random(10)
    processor = DenseClipImageProcessor(size=48, test_mode=rng.choice(["slide", "whole"]))
    failures, counts = [], {"result": 0, "clear error": 0}

    def check(name: str, function: Callable, *args, **kwargs) -> None:
        result = outcome(function, *args, **kwargs)
        if result in counts:
            counts[result] += 1
        else:
            failures.append(f"{name}: {result}")

    for _ in range(CASES_PER_ENTRY_POINT):
        model = models[rng.choice(list(models))]
        channels, num_labels = model.config.vision_config.num_channels, model.config.num_labels
        pixels = random_pixels(rng, channels)
        batch = pixels.shape[0] if isinstance(pixels, torch.Tensor) and pixels.ndim == 4 else 1
        labels = random_labels(rng, batch, num_labels) if rng.random() < 0.5 else None
        mode = rng.choice([None, None, "plain", "slide", "whole", "tile", 3])
        check(
            f"forward(pixels {getattr(pixels, 'shape', pixels)!r}, labels, {mode})",
            model,
            pixels,
            labels=labels,
            test_mode=mode,
        )
        good = torch.randn(1, channels, 32, 48)
        inputs = rng.choice(
            [
                good,
                [good, torch.randn(1, channels, 64, 64)],
                [good, torch.randn(2, channels, 32, 32)],
                pixels,
                [],
                [good, "x"],
            ]
        )
        settings = dict(
            output_size=random_size(rng),
            flip=rng.choice([False, True, 1, "yes"]),
            mode=rng.choice([None, "slide", "whole", "x"]),
            crop_size=rng.choice([None, random_size(rng)]),
            stride=rng.choice([None, random_size(rng)]),
        )
        check(f"predict_probabilities({settings})", model.predict_probabilities, inputs, **settings)
        logits = torch.randn(rng.choice([1, 2]), num_labels, 8, 8)
        outputs = rng.choice(
            [
                DenseClipSemanticSegmenterOutput(logits=logits),
                DenseClipSemanticSegmenterOutput(logits=logits[0]),
                None,
                {"logits": logits},
            ]
        )
        sizes = rng.choice(
            [
                None,
                [random_size(rng)] * len(logits),
                torch.tensor([[0, 5]] * len(logits)),
                torch.full((len(logits), 2), 4.5),
                [(8, 8)] * 3,
                5,
            ]
        )
        check(
            f"post_process({sizes!r})",
            processor.post_process_semantic_segmentation,
            outputs,
            target_sizes=sizes,
        )
        image = random_image(rng)
        label_map = rng.choice([None, None, np.zeros((40, 40), np.uint8), np.zeros((3, 3, 3), np.float32), "x"])
        kwargs = rng.choice(
            [
                {},
                {"return_tensors": "pt"},
                {"size": random_size(rng)},
                {"scale_ratios": rng.choice([[], [0.0], [-1.0], [0.5, 1.0]])},
            ]
        )
        check(
            f"processor({getattr(image, 'shape', image)!r}, {kwargs})",
            processor,
            image,
            segmentation_maps=label_map,
            **kwargs,
        )
    cases = len(failures) + sum(counts.values())
    assert not failures, f"{len(failures)} of {cases} cases failed unclearly:\n" + "\n".join(failures)
    # Not only rejections: the generator also reaches the paths that give results.
    assert counts["result"] >= cases // 20 and counts["clear error"] >= cases // 2, counts


@pytest.fixture(scope="module")
def vit(models) -> DenseClipForSemanticSegmentation:
    return models["vit"]


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: m(torch.randn(1, 3, 16, 16), test_mode="plain"), ValueError, "at least 32"),
        (lambda m: m(torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8)), TypeError, "floating-point"),
        (lambda m: m(torch.randn(3, 32, 32)), ValueError, "pixel_values[None]"),
        (lambda m: m(torch.randn(1, 4, 32, 32)), ValueError, "(batch, 3, height, width)"),
        (lambda m: m(torch.randn(1, 3, 32, 32), labels=torch.full((1, 32, 32), 7)), ValueError, "[7]"),
        (lambda m: m(torch.randn(1, 3, 32, 32), labels=torch.full((1, 32, 32), -1)), ValueError, "0..3"),
        (lambda m: m(torch.randn(1, 3, 32, 32), labels=torch.zeros(1, 32, 32)), TypeError, "integer"),
        (lambda m: m(torch.randn(1, 3, 32, 32), labels=torch.zeros(32, 32, dtype=torch.long)), ValueError, "labels"),
        (lambda m: m(torch.randn(1, 3, 32, 32), test_mode="tile"), ValueError, "test_mode"),
        (lambda m: m.predict_probabilities(torch.randn(1, 3, 32, 32), (0, 5)), ValueError, "output_size"),
        (lambda m: m.predict_probabilities(torch.randn(1, 3, 32, 32), (8, 8), crop_size=0), ValueError, "crop_size"),
        (lambda m: m.predict_probabilities(torch.randn(1, 3, 32, 32), (8, 8), stride=-4), ValueError, "stride"),
    ],
)
def test_known_bad_model_input_names_the_problem(vit, call, error, words):
    with pytest.raises(error) as raised:
        call(vit)
    assert words in str(raised.value)


def test_labels_at_the_ignore_index_still_train(vit):
    labels = torch.full((1, 32, 32), vit.config.semantic_loss_ignore_index)
    labels[0, 0, 0] = vit.config.num_labels - 1
    assert torch.isfinite(vit(torch.randn(1, 3, 32, 32), labels=labels).loss)


@pytest.mark.parametrize("sizes", [[(0, 5)], [(5, -2)], torch.tensor([[0, 5]]), [(4.5, 4)], [(4,)], "4x4"])
def test_post_processing_rejects_bad_target_sizes(sizes):
    outputs = DenseClipSemanticSegmenterOutput(logits=torch.randn(1, 4, 8, 8))
    with pytest.raises((ValueError, TypeError)) as raised:
        DenseClipImageProcessor().post_process_semantic_segmentation(outputs, target_sizes=sizes)
    assert "target_sizes" in str(raised.value)


@pytest.mark.parametrize("shape", [(0, 10, 3), (10, 0), (0, 0)])
def test_processor_rejects_images_without_pixels(shape):
    with pytest.raises(ValueError, match="at least one pixel"):
        DenseClipImageProcessor()(np.zeros(shape, np.uint8))


def test_pipeline_passes_the_clear_errors_on(vit):
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=vit, image_processor=DenseClipImageProcessor(size=32))
    assert len(segmenter(Image.new("RGB", (40, 32)))) >= 1
    with pytest.raises(ValueError, match="at least one pixel"):
        segmenter(Image.new("RGB", (0, 4)))
    with pytest.raises(ALLOWED):
        segmenter(12)


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _edit_config(**values) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **values}))

    return edit


@pytest.mark.parametrize(
    ("damage", "error", "words"),
    [
        (_truncate, OSError, "model.safetensors"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b""), OSError, "model.safetensors"),
        (lambda folder: (folder / "model.safetensors").unlink(), OSError, "model.safetensors"),
        (lambda folder: (folder / "config.json").unlink(), OSError, "config.json"),
        (lambda folder: (folder / "config.json").write_text("{not json"), OSError, "config.json"),
        (_edit_config(fpn_channels="wide"), TypeError, "fpn_channels"),
        (_edit_config(vision_config="x"), TypeError, "vision_config"),
        (_edit_config(id2label=["wall", "sky"]), TypeError, "id2label"),
        (_edit_config(class_token_ids=[[1]]), ValueError, "class_token_ids"),
    ],
)
def test_damaged_folder_names_the_file(vit, tmp_path, damage, error, words):
    vit.save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises(error) as raised:
        DenseClipForSemanticSegmentation.from_pretrained(tmp_path)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["--checkpoint", "{missing}", "--output_dir", "{out}"],
        ["--checkpoint", "{damaged}", "--output_dir", "{out}"],
    ],
)
@pytest.mark.parametrize("module", ["convert_denseclip_original_to_hf", "convert_clip_original_to_hf"])
def test_converters_on_bad_checkpoints(tmp_path, module, argv):
    import importlib

    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a checkpoint")
    main = importlib.import_module(f"denseclip_hf.{module}").main
    argv = [arg.format(damaged=damaged, missing=tmp_path / "missing.pth", out=tmp_path / "out") for arg in argv]
    with pytest.raises(ALLOWED) as raised:
        main(argv)
    assert str(raised.value).strip()


def test_out_of_range_labels_are_named_in_training(tokenizer):
    model = make_model(tiny_config(tokenizer)).train()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([4, 0, 255, -2]).repeat(2, 8, 8)}
    with pytest.raises(ValueError, match=r"class ids \[-2, 4\] outside the valid range 0\.\.3"):
        model(**batch).loss.backward()
