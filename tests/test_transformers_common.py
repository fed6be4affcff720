"""transformers' own common test suites run on DenseCLIP, as transformers' model tests run them (subclassed the way
`tests/models/segformer` and `tests/models/upernet` do), on tiny ViT, ResNet and backbone configs.

The suites come from the sdist of the installed transformers (`transformers_suites.py`). Every skip below says why
DenseCLIP differs, as transformers' own model tests do.
"""

import unittest

import numpy as np
import torch
from PIL import Image
from transformers import CLIPTokenizer
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES, MODEL_MAPPING_NAMES
from transformers_suites import import_suite

import denseclip_hf
from denseclip_hf import (
    DenseClipBackbone,
    DenseClipBackboneConfig,
    DenseClipConfig,
    DenseClipForSemanticSegmentation,
    DenseClipImageProcessor,
    DenseClipModel,
    DenseClipResNetConfig,
    tokenize_class_names,
)

modeling_common = import_suite("test_modeling_common")
configuration_common = import_suite("test_configuration_common")
backbone_common = import_suite("test_backbone_common")
image_processing_common = import_suite("test_image_processing_common")

# The suites skip base models and backbones in their training tests by looking their class names up in transformers'
# static name tables, which list transformers' own models only; `AutoModel.register` / `AutoBackbone.register` put
# ours in the Auto classes instead. Listing them here makes the suites treat them as they treat transformers' own.
MODEL_MAPPING_NAMES.setdefault(DenseClipConfig.model_type, DenseClipModel.__name__)
MODEL_FOR_BACKBONE_MAPPING_NAMES.setdefault(DenseClipBackboneConfig.model_type, DenseClipBackbone.__name__)

TOKENIZER = CLIPTokenizer.from_pretrained(denseclip_hf.CLIP_TOKENIZER_PATH)
CLASS_NAMES = ["wall", "sky", "tree"]
# Small enough for the suites' 1M-parameter limit: the text tower's 49408-token embedding dominates.
TEXT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
# The ViT pyramid reads 4 different layers (`vision_feature_layers`), so the tower has 4 (the suites want <= 2).
VISION = {
    "vit": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, patch_size=16),
    "resnet": dict(model_type="denseclip_resnet_vision", layers=[1, 1, 1, 1], width=4, attention_pool_heads=2),
}


class DenseClipModelTester:
    """Tiny configs and inputs for the suites: a batch of 2 images of 64x64 pixels, 3 classes."""

    def __init__(self, parent, family: str, config_class=DenseClipConfig, **overrides):
        self.parent = parent
        self.family = family
        self.config_class = config_class
        self.overrides = overrides
        self.batch_size = 2
        self.num_channels = 3
        self.image_size = 64
        self.num_labels = len(CLASS_NAMES)
        self.is_training = True
        self.text_config = TEXT
        self.vision_config = VISION[family]

    def get_config(self) -> DenseClipConfig:
        return self.config_class(
            text_config=self.text_config,
            vision_config=self.vision_config,
            projection_dim=8,
            num_context_tokens=2,
            context_decoder_layers=1,
            context_decoder_hidden_size=8,
            context_decoder_heads=2,
            fpn_channels=8,
            decode_head_channels=8,
            id2label=dict(enumerate(CLASS_NAMES)),
            class_token_ids=tokenize_class_names(CLASS_NAMES, TOKENIZER, 5),
            **self.overrides,
        )

    def prepare_config_and_inputs_for_common(self):
        shape = [self.batch_size, self.num_channels, self.image_size, self.image_size]
        return self.get_config(), {"pixel_values": modeling_common.floats_tensor(shape)}


class DenseClipModelTestBase(modeling_common.ModelTesterMixin):
    """`ModelTesterMixin` on `DenseClipModel` and `DenseClipForSemanticSegmentation` of one encoder family."""

    family = "vit"
    all_model_classes = (DenseClipModel, DenseClipForSemanticSegmentation)
    test_resize_embeddings = False
    test_torch_exportable = False  # the deployable single pass has its own export tests (tests/test_export.py)
    test_can_init_all_missing_weights_before_2023 = True  # run it: `_init_weights` covers every tensor
    has_attentions = False  # the outputs carry no attention weights (like UperNet's)

    def setUp(self):
        self.model_tester = DenseClipModelTester(self, self.family)
        self.config_tester = configuration_common.ConfigTester(
            self, config_class=DenseClipConfig, has_text_modality=False
        )

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is DenseClipForSemanticSegmentation:
            side, batch = self.model_tester.image_size, self.model_tester.batch_size
            stripes = torch.arange(side * side).reshape(side, side) // side % self.model_tester.num_labels
            inputs["labels"] = stripes.expand(batch, side, side).to(modeling_common.torch_device)
        return inputs

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_hidden_states_output(self):
        """The stem and the 4 pyramid levels (strides 4-32), asked for by argument or by the config."""
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        side = self.model_tester.image_size
        stem_stride = {"vit": VISION["vit"]["patch_size"], "resnet": 4}[self.family]
        for model_class in self.all_model_classes:
            for via_config in (False, True):
                config.output_hidden_states = via_config
                model = model_class(config).eval()
                with torch.no_grad():
                    outputs = model(**inputs_dict, **({} if via_config else {"output_hidden_states": True}))
                sizes = [tuple(state.shape[-2:]) for state in outputs.hidden_states]
                self.assertEqual(sizes, [(side // stride, side // stride) for stride in (stem_stride, 4, 8, 16, 32)])
            config.output_hidden_states = False

    @unittest.skip(reason="DenseCLIP's inputs are images: no input embeddings")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="DenseCLIP's inputs are images: no input embeddings")
    def test_model_get_set_embeddings(self):
        pass


class DenseClipViTModelTest(DenseClipModelTestBase, unittest.TestCase):
    family = "vit"

    @unittest.skip(reason="The pyramid taps 4 different ViT layers (`vision_feature_layers`): the tower needs 4")
    def test_num_layers_is_small(self):
        pass


class DenseClipResNetModelTest(DenseClipModelTestBase, unittest.TestCase):
    family = "resnet"


class DenseClipBackboneTest(backbone_common.BackboneTesterMixin, unittest.TestCase):
    """`BackboneTesterMixin` on `DenseClipBackbone` (ViT and ResNet image encoders), `ConfigTester` on its config."""

    all_model_classes = (DenseClipBackbone,)
    has_attentions = False
    config_class = DenseClipBackboneConfig

    def setUp(self):
        self.model_tester = DenseClipModelTester(self, "vit", config_class=DenseClipBackboneConfig)

    def test_config_common(self):
        configuration_common.ConfigTester(
            self, config_class=DenseClipBackboneConfig, has_text_modality=False
        ).run_common_tests()

    def test_resnet_encoder(self):
        """The mixin's checks of outputs and stage selection, on the ResNet image encoder."""
        self.model_tester = DenseClipModelTester(self, "resnet", config_class=DenseClipBackboneConfig)
        self.test_create_from_modified_config()
        self.test_backbone_outputs()
        self.test_backbone_stage_selection()


class DenseClipResNetConfigTest(unittest.TestCase):
    """`ConfigTester` on the CLIP ResNet configuration (`DenseClipConfig`'s runs in the model tests)."""

    def test_resnet_config(self):
        # CLIP's ResNet has no attention layers: its common properties are its input channels and resolution.
        configuration_common.ConfigTester(
            self,
            config_class=DenseClipResNetConfig,
            has_text_modality=False,
            common_properties=["num_channels", "image_size"],
        ).run_common_tests()


class DenseClipImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent):
        super().__init__(parent, batch_size=3, min_resolution=30, max_resolution=120)
        self.size = {"shortest_edge": 64, "longest_edge": 128}
        self.num_labels = 3

    def _get_image_processing_classes(self):
        # Found by the test file's folder in transformers' own tree; DenseCLIP's processor is registered instead.
        return {"pil": DenseClipImageProcessor}

    def prepare_image_inputs(self, *args, equal_resolution=False, **kwargs):
        # The processor does not pad a batch of different sizes (padding changes DenseCLIP's predictions; the authors
        # test one image at a time) and says so with a ValueError (tests/test_image_processing.py): equal sizes here.
        return super().prepare_image_inputs(*args, equal_resolution=True, **kwargs)

    def expected_output_image_shape(self, images):
        """The authors' keep-ratio rule (mmseg `rescale_size`): scale `min(long / long side, short / short side)`,
        sides `int(side * scale + 0.5)` (transformers' own rule truncates). The inputs are PIL images, NumPy arrays
        `(height, width, channels)` or torch tensors `(channels, height, width)`, all of one size here."""
        image = images[0]
        if isinstance(image, Image.Image):
            height, width = image.height, image.width
        elif isinstance(image, np.ndarray):
            height, width = image.shape[:2]
        else:
            height, width = image.shape[1:]
        scale = min(self.size["longest_edge"] / max(height, width), self.size["shortest_edge"] / min(height, width))
        return self.num_channels, int(height * scale + 0.5), int(width * scale + 0.5)

    def prepare_post_process_semantic_segmentation_inputs(self):
        logits = torch.randn(self.batch_size, self.num_labels, 16, 24)
        expected = {"num_labels": self.num_labels, "height": 16, "width": 24}
        return {"outputs": SemanticSegmenterOutput(logits=logits)}, expected


class DenseClipImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = DenseClipImageProcessingTester

    @unittest.skip(
        reason="The package avoids torchvision, whose compiled ops do not load beside CPU builds of torch: the Pillow "
        "backend is the processor's only one"
    )
    def test_new_models_require_torchvision_backend(self):
        pass
