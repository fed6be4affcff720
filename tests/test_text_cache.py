"""Class text embeddings computed once in eval mode and recomputed whenever anything they come from changes; text
embeddings from the caller; the deployable model without the CLIP text tower."""

import numpy as np
import pytest
import torch
from conftest import CLASS_NAMES, make_model, run_without_denseclip_hf, tiny_config
from PIL import Image
from transformers import pipeline

from denseclip_hf import DenseClipForSemanticSegmentation, DenseClipImageProcessor, tokenize_class_names


def fresh_text_embeddings(model: DenseClipForSemanticSegmentation) -> torch.Tensor:
    """t computed from scratch through the text tower, no cache involved."""
    base = model.denseclip
    with torch.no_grad():
        return base.text_encoder(base.class_token_ids, base.prompting.text_contexts())


def count_text_tower_runs(model: DenseClipForSemanticSegmentation) -> list:
    runs = []
    model.denseclip.text_encoder.register_forward_hook(lambda *args: runs.append(1))
    return runs


def assert_uses_current_text_embeddings(model: DenseClipForSemanticSegmentation, pixel_values: torch.Tensor) -> None:
    """A plain eval forward equals the forward on t computed from scratch now."""
    with torch.no_grad():
        logits = model(pixel_values, test_mode="plain").logits
        expected = model(pixel_values, test_mode="plain", text_embeddings=fresh_text_embeddings(model)).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.fixture
def model(family_config):
    return make_model(family_config)


@pytest.fixture
def pixel_values():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_eval_forwards_and_windows_run_the_text_tower_once(model, pixel_values):
    runs = count_text_tower_runs(model)
    with torch.no_grad():
        first = model(pixel_values, test_mode="plain").logits
        second = model(pixel_values, test_mode="plain").logits
        model.predict_probabilities(pixel_values, (64, 64), mode="slide", crop_size=32, stride=16, flip=True)
    with torch.inference_mode():
        model(pixel_values, test_mode="whole")
    assert len(runs) == 1
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert_uses_current_text_embeddings(model, pixel_values)


def step_the_contexts(model, pixel_values):
    """An optimizer step on the learnable contexts (gradients through the frozen text tower)."""
    model.train()
    optimizer = torch.optim.SGD([model.denseclip.prompting.context_embeddings], lr=10.0)
    labels = torch.randint(0, len(CLASS_NAMES), (2, 64, 64), generator=torch.Generator().manual_seed(1))
    model(pixel_values, labels=labels).loss.backward()
    optimizer.step()
    model.eval()


def load_other_weights(model, pixel_values):
    other = make_model(model.config, seed=1)
    model.load_state_dict(other.state_dict())


def edit_the_contexts_in_place(model, pixel_values):
    with torch.no_grad():
        model.denseclip.prompting.context_embeddings.mul_(-1.5)


def change_the_class_token_ids(model, pixel_values):
    model.denseclip.class_token_ids = model.denseclip.class_token_ids.flip(0)


def change_the_dtype(model, pixel_values):
    model.double()


CHANGES = [step_the_contexts, load_other_weights, edit_the_contexts_in_place, change_the_class_token_ids]


@pytest.mark.parametrize("change", [*CHANGES, change_the_dtype], ids=lambda change: change.__name__)
def test_a_change_of_any_input_recomputes_the_text_embeddings(model, pixel_values, change):
    with torch.no_grad():
        model(pixel_values, test_mode="plain")  # fills the cache
    before = fresh_text_embeddings(model)
    change(model, pixel_values)
    if change in CHANGES:  # the change is real: t is different now
        assert not torch.allclose(fresh_text_embeddings(model), before)
    pixel_values = pixel_values.to(next(model.parameters()).dtype)
    assert_uses_current_text_embeddings(model, pixel_values)
    assert model.denseclip.get_text_embeddings().dtype == next(model.parameters()).dtype


def test_training_and_gradients_never_use_the_cache(model, pixel_values):
    """In training mode, and in eval mode when autograd needs t's graph, the text tower runs on every forward and
    gradients reach the contexts."""
    runs = count_text_tower_runs(model)
    with torch.no_grad():
        model(pixel_values, test_mode="plain")
    for mode in ("train", "eval"):
        getattr(model, mode)()
        model.zero_grad()
        model(pixel_values, test_mode="plain").logits.sum().backward()
        assert model.denseclip.prompting.context_embeddings.grad.abs().sum() > 0
    assert len(runs) == 3


def test_cache_filled_under_inference_mode_serves_autograd_later(model, pixel_values):
    """t cached inside `torch.inference_mode` is a normal tensor: a later gradient w.r.t. the input works."""
    with torch.inference_mode():
        model(pixel_values, test_mode="plain")
    model.requires_grad_(False)
    pixel_values = pixel_values.clone().requires_grad_()
    model(pixel_values, test_mode="plain").logits.sum().backward()
    assert pixel_values.grad.abs().sum() > 0


def test_text_embeddings_of_other_class_names(model, pixel_values, tokenizer):
    """Re-prompting: t of other class names (as many) given to the forward equals a model built for those names."""
    names = ["road", "tree", "person", "car"]
    ids = tokenize_class_names(names, tokenizer, model.config.class_name_token_length)
    text_embeddings = model.get_text_embeddings(class_token_ids=torch.tensor(ids))
    other = DenseClipForSemanticSegmentation(tiny_config(tokenizer, names, vision_config=model.config.vision_config))
    other.load_state_dict(model.state_dict())
    other.eval()
    with torch.no_grad():
        for mode in ("plain", "slide"):
            given = model(pixel_values, test_mode=mode, text_embeddings=text_embeddings).logits
            torch.testing.assert_close(given, other(pixel_values, test_mode=mode).logits, rtol=0, atol=1e-6)


def test_text_embeddings_of_the_wrong_shape_or_type(model, pixel_values):
    with pytest.raises(ValueError, match=r"\(num_labels, projection_dim\) = \(4, 24\)"):
        model(pixel_values, text_embeddings=torch.zeros(3, 24))
    with pytest.raises(TypeError, match="floating-point"):
        model(pixel_values, text_embeddings=torch.zeros(4, 24, dtype=torch.long))


@pytest.fixture
def deployed(model, tmp_path):
    """The model, its outputs, and the folder of its text-free version."""
    image = Image.fromarray(np.random.RandomState(3).randint(0, 256, (48, 72, 3), dtype=np.uint8))
    processor = DenseClipImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        expected = {mode: model(inputs["pixel_values"], test_mode=mode).logits for mode in ("plain", "slide")}
    text_tower = sum(parameter.numel() for parameter in model.denseclip.text_encoder.parameters())
    total = model.num_parameters()
    model.remove_text_encoder()
    assert model.num_parameters() == total - text_tower and model.denseclip.text_encoder is None
    model.save_pretrained(tmp_path / "deployed")
    processor.save_pretrained(tmp_path / "deployed")
    return model, image, inputs, expected, tmp_path / "deployed"


def test_without_the_text_tower_outputs_are_identical(deployed):
    model, image, inputs, expected, folder = deployed
    loaded = DenseClipForSemanticSegmentation.from_pretrained(folder).eval()
    assert loaded.config.text_encoder_removed and loaded.denseclip.text_encoder is None
    assert not any(name.startswith("denseclip.text_encoder") for name in loaded.state_dict())
    with torch.no_grad():
        for mode, logits in expected.items():
            torch.testing.assert_close(model(inputs["pixel_values"], test_mode=mode).logits, logits, rtol=0, atol=0)
            torch.testing.assert_close(loaded(inputs["pixel_values"], test_mode=mode).logits, logits, rtol=0, atol=0)
    segments = pipeline("image-segmentation", model=str(folder))(image)
    labels = np.zeros(image.size[::-1], dtype=np.int64)
    for segment in segments:
        labels[np.asarray(segment["mask"]) > 0] = CLASS_NAMES.index(segment["label"])
    resized = torch.nn.functional.interpolate(expected["slide"], size=image.size[::-1], mode="bilinear")
    np.testing.assert_array_equal(labels, resized.argmax(1)[0].numpy())


def test_without_the_text_tower_loads_as_remote_code(deployed, tmp_path):
    model, image, inputs, expected, folder = deployed
    torch.save({"inputs": inputs["pixel_values"], "logits": expected["slide"]}, tmp_path / "expected.pt")
    run_without_denseclip_hf(
        f"""
        import torch
        from transformers import AutoModelForSemanticSegmentation

        model = AutoModelForSemanticSegmentation.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert model.base_model.text_encoder is None
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(expected["inputs"], test_mode="slide").logits
        torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=0)
        """,
        tmp_path,
    )


def test_without_the_text_tower_training_is_a_clear_error(deployed):
    model, _, inputs, _, _ = deployed
    model.train()
    with pytest.raises(ValueError, match="remove_text_encoder.*cannot train"):
        model(inputs["pixel_values"], labels=torch.zeros(1, 64, 96, dtype=torch.long))
    with pytest.raises(ValueError, match="already removed"):
        model.remove_text_encoder()
