"""The transformers behaviours that `modeling_denseclip.py` works around, each with no public alternative. If one of
these tests fails, transformers changed: revisit (and probably delete) the workaround it names."""

import logging

import torch
from conftest import make_model, tiny_config
from transformers import PreTrainedModel

from denseclip_hf import DenseClipModel
from denseclip_hf.loading_denseclip import CLIP_KEY_MAPPING, _without_load_report


def warnings_logged(function) -> list[str]:
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    try:
        function()
    finally:
        transformers_logger.removeHandler(handler)
    return [record.getMessage() for record in records if record.levelno >= logging.WARNING]


def test_from_pretrained_reports_missing_tensors_as_a_load_report(tiny_clip_dir, tokenizer):
    """`_without_load_report`: transformers logs a warning containing "LOAD REPORT" (logger
    `transformers.modeling_utils`) for a checkpoint that lacks tensors, and the helper drops exactly that record."""
    config = tiny_config(tokenizer)

    def load():
        DenseClipModel.from_pretrained(tiny_clip_dir, config=config, key_mapping=CLIP_KEY_MAPPING)

    reported = warnings_logged(load)
    assert len(reported) == 1 and "LOAD REPORT" in reported[0] and "prompting.context_embeddings" in reported[0]
    with _without_load_report():
        assert warnings_logged(load) == []


def test_custom_models_skip_the_init_of_modules_without_parameters_of_their_own(tokenizer):
    """`DenseClipPreTrainedModel.is_custom_code`: for a model defined outside transformers, the stock
    `_initialize_weights` does not run `_init_weights` on a module that owns no parameter itself (the FPN neck, whose
    convolutions get a Xavier init), even when none of its tensors was loaded."""
    model = make_model(tiny_config(tokenizer))
    assert PreTrainedModel.is_custom_code.__func__(type(model))  # transformers' own rule: a model defined elsewhere
    assert not model.is_custom_code()  # the workaround
    neck = model.decoder.neck
    assert not list(neck.parameters(recurse=False))

    def reset():
        with torch.no_grad():
            for conv in neck.lateral_convs:
                conv.bias.fill_(1.0)
        for tensor in neck.parameters():
            tensor._is_hf_initialized = False
        neck._is_hf_initialized = False

    reset()
    PreTrainedModel._initialize_weights(model, neck, is_custom_code=True)
    assert all(torch.equal(conv.bias, torch.ones_like(conv.bias)) for conv in neck.lateral_convs)  # skipped
    reset()
    model._initialize_weights(neck, is_custom_code=model.is_custom_code())  # the workaround: DenseCLIP's init runs
    assert all(torch.equal(conv.bias, torch.zeros_like(conv.bias)) for conv in neck.lateral_convs)
