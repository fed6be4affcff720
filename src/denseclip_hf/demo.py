"""What the demo app (`examples/app.py`) does, without the user interface: load a model, segment, draw.

```python
from denseclip_hf.demo import SegmentationDemo

demo = SegmentationDemo.from_pretrained("outputs/denseclip-synthetic")  # a folder or a Hub repo id
overlay, heatmap = demo.pictures(image, class_name="sky")
```
"""

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_processing_denseclip import DenseClipImageProcessor
from .modeling_denseclip import DenseClipForSemanticSegmentation
from .visualization import (
    ImageLike,
    LegendMode,
    palette_for,
    score_map_figure,
    segmentation_figure,
    to_rgb_image,
    top_classes,
)

# Where the default training run, `accelerate launch examples/train_seg.py`, saves its model (`--output_dir` defaults
# to `outputs/denseclip-{recipe}` and the recipe without a dataset is "synthetic").
DEFAULT_MODEL = "outputs/denseclip-synthetic"


@dataclass
class Segmentation:
    """One image's segmentation: `label_map` `(height, width)` int64 class ids at the image's size, and
    `score_map` `(num_labels, h, w)` float32, the pixel-text cosine similarities at the image encoder's stride
    (`None` for a model without text, `prompting_type="none"`, the CLIP + Semantic FPN baseline)."""

    label_map: np.ndarray
    score_map: np.ndarray | None


class SegmentationDemo:
    """A DenseCLIP model with its image processor, turning images into segmentations and pictures."""

    def __init__(self, model: DenseClipForSemanticSegmentation, processor: DenseClipImageProcessor):
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike = DEFAULT_MODEL,
        revision: str | None = None,
        device: str | None = None,
    ) -> "SegmentationDemo":
        """Loads a saved model folder or a Hub repository (`revision`: a branch, tag or commit) onto `device`
        (default: CUDA if available, else CPU)."""
        name = str(model_name_or_path)
        looks_like_a_path = name == DEFAULT_MODEL or name.startswith((".", "~", "/")) or name.count("/") > 1
        if looks_like_a_path and not Path(name).expanduser().exists():
            hint = (
                "train it first with `accelerate launch examples/train_seg.py` (about 3 minutes on a CPU), or "
                if name == DEFAULT_MODEL
                else ""
            )
            raise FileNotFoundError(
                f"No model folder at {name} ({Path(name).absolute()}): {hint}pass --model_name_or_path with a saved "
                "model folder or a Hub repository id (e.g. org/denseclip-vit-b16-ade20k)."
            )
        name = os.path.expanduser(name)
        model = DenseClipForSemanticSegmentation.from_pretrained(name, revision=revision)
        processor = DenseClipImageProcessor.from_pretrained(name, revision=revision)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model.to(device), processor)

    @property
    def class_names(self) -> list[str]:
        """The model's class names, in class-id order."""
        return [self.model.config.id2label[label] for label in range(self.model.config.num_labels)]

    @torch.inference_mode()
    def segment(self, image: ImageLike) -> Segmentation:
        """Runs the model on one image. The label map is what the `image-segmentation` pipeline gives: processor,
        forward with the protocol the processor's output asks for (its `test_mode`, e.g. sliding windows),
        `post_process_semantic_segmentation` at the image's size. The score map comes from one single pass over the
        whole image (the input rounded to the processor's `size_divisor`). The one place where the app,
        `examples/visualize.py` and the tests run the model."""
        image = to_rgb_image(image)
        inputs = self.processor(images=image, return_tensors="pt").to(self.model.device)
        outputs = self.model(**inputs)
        label_map = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]
        label_map = label_map.cpu().numpy()
        if not self.model.base_model.prompting.uses_text:
            return Segmentation(label_map=label_map, score_map=None)
        whole = self.processor(images=image, test_mode="whole", return_tensors="pt").to(self.model.device)
        score_map = self.model(whole["pixel_values"]).score_map[0]
        return Segmentation(label_map=label_map, score_map=score_map.float().cpu().numpy())

    def pictures(
        self, image: ImageLike, class_name: str | None = None, legend: LegendMode = "present"
    ) -> tuple[Image.Image, Image.Image | None]:
        """The segmentation overlay with its legend, and the score-map heatmap of `class_name` (default: the class
        with the highest peak score; `None` for a model without a score map)."""
        image = to_rgb_image(image)
        segmentation = self.segment(image)
        names = self.class_names
        overlay = segmentation_figure(
            image, segmentation.label_map, names, palette_for(self.model.config), legend=legend
        )
        if segmentation.score_map is None:
            return overlay, None
        shown = top_classes(segmentation.score_map, 1)[0] if class_name is None else class_name
        return overlay, score_map_figure(image, segmentation.score_map, names, shown)


__all__ = ["DEFAULT_MODEL", "Segmentation", "SegmentationDemo"]
