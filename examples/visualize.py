"""Pictures of a DenseCLIP model's predictions: segmentations with a legend, and pixel-text score-map heatmaps.

    python examples/visualize.py --images street.jpg park.png --output_dir pictures
    python examples/visualize.py --synthetic 3 --output_dir pictures   # bundled synthetic scenes, with ground truth

For each image it writes `NAME_segmentation.png` (the prediction over the image, with a legend) and
`NAME_score_maps.png` (the score maps of the best-matching classes), and `predictions.png` (image | ground truth |
prediction rows). The default model is the one `accelerate launch examples/train_seg.py` saves. See
docs/visualization.md.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from denseclip_hf.demo import DEFAULT_MODEL, SegmentationDemo
from denseclip_hf.visualization import (
    palette_for,
    prediction_grid,
    save_figure,
    score_map_grid,
    segmentation_figure,
)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", default=DEFAULT_MODEL, help="A saved model folder or a Hub repo id.")
    parser.add_argument("--revision", default=None, help="Hub branch, tag or commit.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", nargs="+", type=Path, help="Image files.")
    source.add_argument("--synthetic", type=int, help="The first N scenes of the bundled synthetic validation split.")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--top_k", type=int, default=6, help="Classes in each score-map grid.")
    args = parser.parse_args(argv)

    try:
        demo = SegmentationDemo.from_pretrained(args.model_name_or_path, revision=args.revision)
    except (OSError, ValueError) as error:
        parser.exit(1, f"{error}\n")
    names, palette = demo.class_names, palette_for(demo.model.config)
    if args.images is not None:
        images = {path.stem: Image.open(path) for path in args.images}
        ground_truths = None
    else:
        from denseclip_hf import SYNTHETIC_CLASS_NAMES, load_synthetic_dataset

        if names != SYNTHETIC_CLASS_NAMES:
            parser.exit(
                1, f"--synthetic needs a model of the synthetic classes {SYNTHETIC_CLASS_NAMES}, not {names}.\n"
            )
        scenes = load_synthetic_dataset("validation", args.synthetic)
        images = {f"synthetic_{index}": scene["image"] for index, scene in enumerate(scenes)}
        ground_truths = [np.asarray(scene["label"]) for scene in scenes]

    written, predictions = [], []
    for name, image in images.items():
        segmentation = demo.segment(image)
        predictions.append(segmentation.label_map)
        figure = segmentation_figure(image, segmentation.label_map, names, palette)
        written.append(save_figure(figure, args.output_dir / f"{name}_segmentation.png"))
        if segmentation.score_map is not None:  # None for the CLIP + Semantic FPN baseline (no text)
            grid = score_map_grid(image, segmentation.score_map, names, top_k=min(args.top_k, len(names)))
            written.append(save_figure(grid, args.output_dir / f"{name}_score_maps.png"))
    grid = prediction_grid(list(images.values()), predictions, names, ground_truths=ground_truths, palette=palette)
    written.append(save_figure(grid, args.output_dir / "predictions.png"))
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
