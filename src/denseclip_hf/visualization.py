"""Pictures of DenseCLIP segmentations and detections, with Pillow and NumPy only.

- [`segmentation_overlay`], [`segmentation_figure`]: class colours blended over an image, with a legend.
- [`score_map_overlay`], [`score_map_figure`], [`score_map_grid`]: the pixel-text score map `outputs.score_map`
  (Eq. 2: the cosine similarity of every pixel's embedding with every class-name embedding, at the image encoder's
  stride) of one class or of the best-matching classes as heatmaps over the image, with a colour bar.
- [`prediction_grid`]: image | ground truth | prediction rows with a legend, for training and evaluation reports.
- [`draw_detections`], [`detection_grid`]: boxes with class names and scores, masks as colour overlays (RetinaNet,
  Mask R-CNN), and ground truth | prediction rows for evaluation reports.
- [`save_figure`]: writes a picture atomically.

Colours come from `config.palette` where the model has one (the authors' ADE20K palette comes with converted
checkpoints, [`palette_for`]), else from [`default_palette`]. Every figure keeps its picture at the top left, at the
image's own size, and puts annotations (legend, caption, colour bar) below it; text grows with the picture so that it
stays readable at any size. Label maps and score maps may be NumPy arrays or torch tensors.
"""

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .configuration_denseclip import IGNORE_INDEX
from .file_utils import write_atomically
from .image_processing_denseclip import image_to_rgb_array, label_map_to_array, to_numpy

# The heatmap colour ramp: viridis (perceptually uniform, readable in greyscale and by colour-blind viewers) sampled
# at 0, 1/4, 1/2, 3/4 and 1, linearly interpolated in between.
HEATMAP_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=np.float64,
)

ImageLike = Image.Image | np.ndarray
ClassNames = Mapping[int, str] | Sequence[str]
LegendMode = Literal["present", "all", "none"]

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_SWATCH_OUTLINE = (64, 64, 64)
_MIN_FONT_SIZE = 12


# ---------------------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------------------


def default_palette(num_colors: int) -> np.ndarray:
    """`(num_colors, 3)` uint8 RGB colours, the same for every call: golden-ratio steps around the hue circle (each
    colour far from the previous ones), alternating between two saturations and two brightnesses."""
    if isinstance(num_colors, bool) or not isinstance(num_colors, int | np.integer) or num_colors < 0:
        raise ValueError(f"num_colors must be a non-negative integer, got {num_colors!r}.")
    index = np.arange(num_colors)
    hue = (index * 0.6180339887498949) % 1.0
    saturation = np.where(index // 2 % 2 == 0, 0.9, 0.6)
    value = np.where(index % 2 == 0, 1.0, 0.75)
    return np.rint(_hsv_to_rgb(hue, saturation, value) * 255).astype(np.uint8)


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Hue, saturation, value `(n,)` in [0, 1] -> RGB `(n, 3)` in [0, 1] (the hexcone model)."""
    sector = np.floor(hue * 6.0)
    fraction = hue * 6.0 - sector
    low = value * (1.0 - saturation)
    falling = value * (1.0 - saturation * fraction)
    rising = value * (1.0 - saturation * (1.0 - fraction))
    choices = [
        (value, rising, low),
        (falling, value, low),
        (low, value, rising),
        (low, falling, value),
        (rising, low, value),
        (value, low, falling),
    ]
    sector = sector.astype(int) % 6
    return np.stack(
        [np.choose(sector, [choice[channel] for choice in choices]) for channel in range(3)], axis=-1
    ).reshape(-1, 3)


def palette_for(config: Any) -> np.ndarray:
    """`(config.num_labels, 3)` uint8: `config.palette` when the model has one, else [`default_palette`]."""
    palette = getattr(config, "palette", None)
    if palette is None:
        return default_palette(config.num_labels)
    return _as_palette(palette, config.num_labels)


def heatmap_colors(values: Any, value_range: tuple[float, float]) -> np.ndarray:
    """Maps `values` (any shape, float) to `(*values.shape, 3)` uint8 colours of the viridis ramp
    [`HEATMAP_ANCHORS`]: `value_range[0]` and below -> the darkest colour, `value_range[1]` and above -> the
    brightest, linear in between."""
    values = _float_array(values, "values")
    low, high = _check_value_range(value_range)
    position = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0) * (len(HEATMAP_ANCHORS) - 1)
    segment = np.minimum(np.floor(position).astype(int), len(HEATMAP_ANCHORS) - 2)
    fraction = (position - segment)[..., None]
    colors = HEATMAP_ANCHORS[segment] * (1.0 - fraction) + HEATMAP_ANCHORS[segment + 1] * fraction
    return np.rint(colors).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation overlays and legends
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegendEntry:
    """One line of a legend: a class id, its name and its colour."""

    label: int
    name: str
    color: tuple[int, int, int]


def classes_present(*label_maps: Any, num_labels: int, ignore_index: int = IGNORE_INDEX) -> list[int]:
    """The sorted class ids that occur in any of `label_maps` (each `(height, width)` integer), without
    `ignore_index`; other values outside `0..num_labels-1` raise a `ValueError`."""
    present: set[int] = set()
    for label_map in label_maps:
        present.update(int(v) for v in np.unique(_label_array(label_map, num_labels, ignore_index)))
    present.discard(ignore_index)
    return sorted(present)


def legend_entries(
    id2label: ClassNames, palette: Any = None, labels: Iterable[int] | None = None
) -> list[LegendEntry]:
    """The legend of the classes `labels` (default: all), in class-id order, coloured by `palette` `(num_labels, 3)`
    (default: [`default_palette`])."""
    names = _class_names(id2label)
    palette = _palette_or_default(palette, len(names))
    shown = range(len(names)) if labels is None else sorted({_class_index(names, label) for label in labels})
    return [LegendEntry(label, names[label], tuple(int(c) for c in palette[label])) for label in shown]


def segmentation_overlay(
    image: ImageLike,
    label_map: Any,
    palette: Any,
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Image.Image:
    """The image with each pixel's class colour blended in, at the image's size.

    Args:
        image: PIL image (any mode) or `(height, width, 3)` / `(height, width)` uint8 array.
        label_map: `(height, width)` integer class ids at the image's size, e.g. from
            `processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]`; pixels
            equal to `ignore_index` keep the image.
        palette: `(num_labels, 3)` RGB colours (0-255), e.g. [`palette_for`]`(model.config)`.
        alpha: weight of the class colour: `round((1 - alpha) * image + alpha * colour)` per channel.

    Returns:
        An RGB PIL image of the image's size.
    """
    pixels = np.asarray(to_rgb_image(image), dtype=np.float64)
    alpha = _check_alpha(alpha)
    palette = _as_palette(palette, None)
    labels = _label_array(label_map, len(palette), ignore_index)
    _check_same_size(labels.shape, pixels.shape[:2], "label_map")
    labelled = labels != ignore_index
    colors = palette[np.where(labelled, labels, 0)].astype(np.float64)
    blended = np.where(labelled[..., None], (1.0 - alpha) * pixels + alpha * colors, pixels)
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def draw_legend(entries: Sequence[LegendEntry], width: int, font_size: int | None = None) -> Image.Image:
    """A white strip with a colour swatch and the name of each entry, wrapped into rows of at most `width` pixels.

    The strip is wider than `width` only if one entry alone is. `font_size` defaults to [`font_size_for`]`(width)`.
    """
    font_size = font_size_for(width) if font_size is None else font_size
    font = _font(font_size)
    pad = max(2, font_size // 3)
    swatch = font_size
    row_height = font_size + 2 * pad
    if not entries:
        return _caption(["no labelled pixels"], width, font_size)
    widths = [swatch + pad + _text_width(font, entry.name) for entry in entries]
    width = max(width, max(widths) + 2 * pad)
    positions, x, y = [], pad, pad
    for item_width in widths:
        if x > pad and x + item_width > width - pad:
            x, y = pad, y + row_height
        positions.append((x, y))
        x += item_width + 3 * pad
    legend = Image.new("RGB", (width, y + row_height + pad), _BACKGROUND)
    draw = ImageDraw.Draw(legend)
    for entry, (x, y) in zip(entries, positions, strict=True):
        top = y + pad
        draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=entry.color, outline=_SWATCH_OUTLINE)
        _draw_text(draw, (x + swatch + pad, top), entry.name, font, font_size)
    return legend


def segmentation_figure(
    image: ImageLike,
    label_map: Any,
    id2label: ClassNames,
    palette: Any = None,
    legend: LegendMode = "present",
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Image.Image:
    """[`segmentation_overlay`] at the top left with a legend below it.

    Args:
        image, label_map, alpha, ignore_index: as in [`segmentation_overlay`].
        id2label: class names, `model.config.id2label` or a list.
        palette: `(num_labels, 3)` colours; default: [`default_palette`] (use [`palette_for`]`(model.config)`).
        legend: `"present"` lists the classes in `label_map`, `"all"` every class, `"none"` draws no legend.

    Returns:
        An RGB PIL image, `image.width` wide (wider only where a single legend entry is), `image.height` plus the
        legend's height tall.
    """
    names = _class_names(id2label)
    palette = _palette_or_default(palette, len(names))
    overlay = segmentation_overlay(image, label_map, palette, alpha, ignore_index)
    return _with_legend(overlay, [label_map], names, palette, legend, ignore_index)


def prediction_grid(
    images: Sequence[ImageLike],
    predictions: Sequence[Any],
    id2label: ClassNames,
    ground_truths: Sequence[Any] | None = None,
    palette: Any = None,
    tile_height: int = 160,
    legend: LegendMode = "present",
    alpha: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> Image.Image:
    """One row per image: the image, its ground-truth overlay (if `ground_truths` is given) and its prediction
    overlay, each scaled to `tile_height` (nearest neighbour, so colours stay exact), column titles on top and a
    legend of the classes shown (`legend` as in [`segmentation_figure`]) at the bottom.

    `predictions` and `ground_truths` are `(height, width)` class-id maps at each image's size.
    """
    _check_positive_int(tile_height, "tile_height")
    if not images:
        raise ValueError("prediction_grid needs at least one image.")
    overlays = (
        {"prediction": predictions}
        if ground_truths is None
        else {"ground truth": ground_truths, "prediction": predictions}
    )
    for title, label_maps in overlays.items():
        if len(label_maps) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(label_maps)} {title} maps: pass one per image.")
    names = _class_names(id2label)
    palette = _palette_or_default(palette, len(names))
    rows = [
        [to_rgb_image(image)]
        + [
            segmentation_overlay(image, label_maps[index], palette, alpha, ignore_index)
            for label_maps in overlays.values()
        ]
        for index, image in enumerate(images)
    ]
    grid, font_size = _tile_grid(rows, ["image", *overlays], tile_height)
    shown = [label_map for label_maps in overlays.values() for label_map in label_maps]
    return _with_legend(grid, shown, names, palette, legend, ignore_index, font_size)


def _tile_grid(rows: list[list[Image.Image]], titles: list[str], tile_height: int) -> tuple[Image.Image, int]:
    """Rows of pictures, each scaled to `tile_height` (nearest neighbour), in columns under `titles`; returns the grid
    and its text size."""
    rows = [[_scale_to_height(tile, tile_height) for tile in row] for row in rows]
    column_widths = [max(row[column].width for row in rows) for column in range(len(titles))]
    gap = 4
    width = sum(column_widths) + gap * (len(titles) + 1)
    font_size = font_size_for(width)
    header = font_size + 2 * gap
    grid = Image.new("RGB", (width, header + len(rows) * (tile_height + gap)), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    lefts = [gap + sum(column_widths[:column]) + column * gap for column in range(len(titles))]
    for left, title in zip(lefts, titles, strict=True):
        _draw_text(draw, (left, gap), title, _font(font_size), font_size)
    for row_index, row in enumerate(rows):
        for left, tile in zip(lefts, row, strict=True):
            grid.paste(tile, (left, header + row_index * (tile_height + gap)))
    return grid, font_size


# ---------------------------------------------------------------------------------------------------------------------
# Detections
# ---------------------------------------------------------------------------------------------------------------------


def draw_detections(
    image: ImageLike,
    boxes: Any,
    labels: Any,
    scores: Any,
    id2label: ClassNames,
    masks: Any = None,
    palette: Any = None,
    alpha: float = 0.5,
    font_size: int | None = None,
) -> Image.Image:
    """The image with detections drawn on it, at the image's size: each instance's mask (if any) blended in its class
    colour, its box outlined in that colour, and a caption `name score` on a colour tab above the box.

    Args:
        image: PIL image (any mode) or `(height, width, 3)` / `(height, width)` uint8 array.
        boxes: `(n, 4)` `(x1, y1, x2, y2)` in pixels of the image, e.g. `processor.post_process_object_detection(
            outputs, threshold=0.3)[0]["boxes"]`.
        labels: `(n,)` class ids (keys of `id2label`).
        scores: `(n,)` scores printed after the names, or `None` (e.g. for ground truth: names only).
        id2label: The class names (`model.config.id2label`).
        masks: `(n, height, width)` boolean masks at the image's size (Mask R-CNN:
            `post_process_instance_segmentation(..., return_binary_maps=True)[0]["segmentation"]`), or `None`.
        palette: `(num_labels, 3)` RGB class colours, default [`default_palette`].
        alpha: weight of the class colour in the masks.
        font_size: caption size, default [`font_size_for`] of the image width.

    Instances are drawn from the lowest score to the highest (so the best ends on top).
    """
    rgb = to_rgb_image(image)
    names = _class_names(id2label)
    palette = _palette_or_default(palette, len(names))
    alpha = _check_alpha(alpha)
    box_array = _array(boxes, "boxes").astype(np.float64).reshape(-1, 4)
    label_array = _array(labels, "labels").astype(np.int64).reshape(-1)
    score_array = None if scores is None else _array(scores, "scores").astype(np.float64).reshape(-1)
    counts = {len(box_array), len(label_array)} | ({len(score_array)} if score_array is not None else set())
    if len(counts) != 1:
        raise ValueError(f"Got {len(box_array)} boxes, {len(label_array)} labels and scores for a different count.")
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(names)):
        raise ValueError(f"labels must be class ids 0..{len(names) - 1}, got {sorted(set(label_array.tolist()))}.")
    order = np.argsort(score_array, kind="stable") if score_array is not None else np.arange(len(label_array))
    pixels = np.asarray(rgb, dtype=np.float64)
    if masks is not None:
        mask_array = np.stack([_array(mask, "masks") for mask in masks]) if len(masks) else np.zeros((0, 1, 1))
        if len(mask_array) != len(label_array) or (len(mask_array) and mask_array.shape[1:] != pixels.shape[:2]):
            raise ValueError(
                f"masks must be (n, height, width) = ({len(label_array)}, {pixels.shape[0]}, {pixels.shape[1]}): "
                f"one mask per detection at the image's size, got {mask_array.shape}."
            )
        for index in order:
            inside = mask_array[index].astype(bool)[..., None]
            pixels = np.where(inside, (1.0 - alpha) * pixels + alpha * palette[label_array[index]], pixels)
    picture = Image.fromarray(np.rint(pixels).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font_size = font_size or font_size_for(picture.width)
    font = _font(font_size)
    line = max(1, round(min(picture.size) / 160))
    for index in order:
        color = tuple(int(c) for c in palette[label_array[index]])
        x1, y1, x2, y2 = box_array[index].tolist()
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=line)
        text = names[label_array[index]] + ("" if score_array is None else f" {score_array[index]:.2f}")
        tab_height = font_size + 2
        top = y1 - tab_height if y1 - tab_height >= 0 else y1
        draw.rectangle([x1, top, x1 + _text_width(font, text) + 2, top + tab_height], fill=color)
        _draw_text(draw, (round(x1) + 1, round(top) + 1), text, font, font_size)
    return picture


def _scale_mask(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """A `(height, width)` boolean mask resized to `size` `(width, height)` by nearest neighbour."""
    pixels = Image.fromarray(_array(mask, "masks").astype(np.uint8))
    return np.asarray(pixels.resize(size, Image.Resampling.NEAREST)) > 0


def detection_grid(
    images: Sequence[ImageLike],
    predictions: Sequence[Mapping[str, Any]],
    id2label: ClassNames,
    ground_truths: Sequence[Mapping[str, Any]] | None = None,
    palette: Any = None,
    tile_height: int = 320,
) -> Image.Image:
    """One row per image: its ground truth (if given) and its predictions drawn by [`draw_detections`], each at
    `tile_height` (the image and its detections scaled first, so that captions stay readable), column titles on top.

    `predictions[i]` / `ground_truths[i]` are dicts with `"boxes"` `(n, 4)` `(x1, y1, x2, y2)` in pixels of image `i`,
    `"labels"` `(n,)`, optionally `"scores"` `(n,)` and `"masks"` `(n, height, width)` at the image's size.
    """
    _check_positive_int(tile_height, "tile_height")
    if not images:
        raise ValueError("detection_grid needs at least one image.")
    columns = (
        {"prediction": predictions}
        if ground_truths is None
        else {"ground truth": ground_truths, "prediction": predictions}
    )
    for title, detections in columns.items():
        if len(detections) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(detections)} {title} entries: pass one per image.")
    rows = []
    for index, image in enumerate(images):
        rgb = to_rgb_image(image)
        scale = tile_height / rgb.height
        scaled = _scale_to_height(rgb, tile_height, Image.Resampling.BILINEAR)
        row = []
        for detections in columns.values():
            entry = detections[index]
            masks = entry.get("masks")
            if masks is not None:
                masks = [_scale_mask(mask, scaled.size) for mask in masks]
            boxes = _array(entry["boxes"], "boxes").astype(np.float64).reshape(-1, 4) * scale
            row.append(
                draw_detections(
                    scaled, boxes, entry["labels"], entry.get("scores"), id2label, masks=masks, palette=palette
                )
            )
        rows.append(row)
    return _tile_grid(rows, list(columns), tile_height)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Score-map heatmaps
# ---------------------------------------------------------------------------------------------------------------------


def score_map_overlay(
    image: ImageLike, class_scores: Any, value_range: tuple[float, float] | None = None, alpha: float = 0.6
) -> Image.Image:
    """One class's score map as a heatmap over the image, at the image's size.

    Args:
        image: PIL image or uint8 array; drawn in grey under the heatmap so that the colours read as scores.
        class_scores: `(h, w)` float scores of one class, e.g. `outputs.score_map[0, k]`; resized bilinearly to the
            image's size (half-pixel centres, as `post_process_semantic_segmentation` resizes the logits).
        value_range: the scores drawn darkest and brightest ([`heatmap_colors`]); default: the map's min and max.
        alpha: weight of the heatmap: `round((1 - alpha) * grey + alpha * colour)` per channel.

    Returns:
        An RGB PIL image of the image's size.
    """
    rgb = to_rgb_image(image)
    alpha = _check_alpha(alpha)
    scores = _float_array(class_scores, "class_scores")
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(
            f"class_scores must be one class's (h, w) score map, got shape {scores.shape}: pass "
            "outputs.score_map[i, k] for image i and class k (score_map_figure takes the full (num_labels, h, w) map)."
        )
    value_range = _data_range([scores]) if value_range is None else value_range
    resized = np.asarray(Image.fromarray(scores.astype(np.float32)).resize(rgb.size, Image.Resampling.BILINEAR))
    heat = heatmap_colors(resized, value_range).astype(np.float64)
    grey = np.asarray(rgb.convert("L").convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.rint((1.0 - alpha) * grey + alpha * heat).astype(np.uint8))


def score_map_figure(
    image: ImageLike,
    score_map: Any,
    id2label: ClassNames,
    class_index: int | str,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.6,
) -> Image.Image:
    """The heatmap of one class ([`score_map_overlay`]) at the top left, its name and a colour bar below it.

    Args:
        image: PIL image or uint8 array.
        score_map: `(num_labels, h, w)` float, one image's `outputs.score_map[i]`.
        id2label: class names, `model.config.id2label` or a list (`num_labels` of them).
        class_index: the class, by id or by name.
        value_range: the scores drawn darkest and brightest; default: this class's min and max.

    Returns:
        An RGB PIL image, `image.width` wide (or the colour bar's minimum width), taller than the image by the caption
        and the colour bar.
    """
    names = _class_names(id2label)
    scores = _score_array(score_map, len(names))
    label = _class_index(names, class_index)
    value_range = _data_range([scores[label]]) if value_range is None else _check_value_range(value_range)
    overlay = score_map_overlay(image, scores[label], value_range, alpha)
    font_size = font_size_for(overlay.width)
    caption = _score_caption(names[label], scores[label], overlay.width, font_size)
    return _stack([overlay, caption, draw_color_bar(value_range, overlay.width, font_size)])


def top_classes(score_map: Any, k: int) -> list[int]:
    """The `k` class ids with the highest peak score in `score_map` `(num_labels, h, w)`, best first."""
    scores = _score_array(score_map, None)
    _check_positive_int(k, "k")
    peaks = scores.reshape(len(scores), -1).max(axis=1)
    return [int(label) for label in np.argsort(-peaks, kind="stable")[:k]]


def score_map_grid(
    image: ImageLike,
    score_map: Any,
    id2label: ClassNames,
    classes: Sequence[int | str] | None = None,
    top_k: int = 6,
    columns: int = 3,
    tile_height: int | None = None,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.6,
) -> Image.Image:
    """Heatmaps of several classes side by side, each captioned, on one shared colour scale shown below.

    Args:
        image, score_map, id2label, alpha: as in [`score_map_figure`].
        classes: the classes to show (ids or names); default: the `top_k` with the highest peak score
            ([`top_classes`]).
        columns: tiles per row.
        tile_height: each tile's height (the image's aspect ratio is kept); default: the image's height, at most 256.
        value_range: the shared scale; default: the min and max over the classes shown.

    Returns:
        An RGB PIL image with `ceil(len(classes) / columns)` rows of tiles, captions and a colour bar.
    """
    names = _class_names(id2label)
    scores = _score_array(score_map, len(names))
    _check_positive_int(columns, "columns")
    labels = top_classes(scores, top_k) if classes is None else [_class_index(names, c) for c in classes]
    if not labels:
        raise ValueError("classes is empty: pass at least one class id or name, or None for the top classes.")
    value_range = _data_range([scores[label] for label in labels]) if value_range is None else value_range
    value_range = _check_value_range(value_range)
    rgb = to_rgb_image(image)
    tile_height = min(rgb.height, 256) if tile_height is None else _check_positive_int(tile_height, "tile_height")
    tile = _scale_to_height(rgb, tile_height, Image.Resampling.BOX)
    font_size = font_size_for(tile.width)
    gap = max(4, font_size // 3)
    tiles = [
        _stack(
            [
                score_map_overlay(tile, scores[label], value_range, alpha),
                _score_caption(names[label], scores[label], tile.width, font_size),
            ]
        )
        for label in labels
    ]
    columns = min(columns, len(tiles))
    cell_width, cell_height = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * cell_width + (columns - 1) * gap, rows * (cell_height + gap)), _BACKGROUND)
    for position, picture in enumerate(tiles):
        grid.paste(picture, ((position % columns) * (cell_width + gap), (position // columns) * (cell_height + gap)))
    return _stack([grid, draw_color_bar(value_range, grid.width, font_size)])


def draw_color_bar(value_range: tuple[float, float], width: int, font_size: int | None = None) -> Image.Image:
    """A horizontal bar of the heatmap colours from `value_range[0]` (left) to `value_range[1]` (right), with the
    low, middle and high values written under it; `width` wide or, if that is too narrow for the numbers, wider.

    The bar's pixel columns `x = pad .. width - pad - 1` (`pad = max(2, font_size // 3)`) show the values
    `low + (high - low) * (x - pad) / (bar_width - 1)`.
    """
    low, high = _check_value_range(value_range)
    font_size = font_size_for(width) if font_size is None else font_size
    font = _font(font_size)
    pad = max(2, font_size // 3)
    ticks = [f"{low:.3f}", f"{(low + high) / 2:.3f}", f"{high:.3f}"]
    width = max(width, sum(_text_width(font, tick) for tick in ticks) + 6 * pad)
    bar_width, bar_height = width - 2 * pad, font_size
    values = low + (high - low) * np.arange(bar_width) / max(1, bar_width - 1)
    bar = np.broadcast_to(heatmap_colors(values, (low, high))[None], (bar_height, bar_width, 3))
    strip = Image.new("RGB", (width, bar_height + font_size + 4 * pad), _BACKGROUND)
    strip.paste(Image.fromarray(np.ascontiguousarray(bar)), (pad, pad))
    draw = ImageDraw.Draw(strip)
    y = pad + bar_height + pad
    tick_widths = [_text_width(font, tick) for tick in ticks]
    for tick, x in zip(ticks, (pad, (width - tick_widths[1]) // 2, width - pad - tick_widths[2]), strict=True):
        _draw_text(draw, (x, y), tick, font, font_size)
    return strip


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def save_figure(figure: Image.Image, path: str | os.PathLike) -> Path:
    """Writes `figure` to `path` (format from the suffix: .png, .jpg, .webp, ...) atomically: a complete file
    appears under `path` or, if anything fails, the previous file (if any) stays. Creates missing parent folders.
    Returns the path."""
    if not isinstance(figure, Image.Image):
        raise TypeError(f"figure must be a PIL image, got {type(figure).__name__}.")
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"Cannot tell the image format of {path}: use a suffix such as .png, .jpg or .webp.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomically(path, lambda file: figure.save(file, format=image_format))


# ---------------------------------------------------------------------------------------------------------------------
# Text and layout
# ---------------------------------------------------------------------------------------------------------------------


def font_size_for(width: int) -> int:
    """The text size of a figure `width` pixels wide: 1/40 of the width, at least 12 pixels."""
    return max(_MIN_FONT_SIZE, round(width / 40))


@lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels (its fixed-size bitmap font where Pillow lacks FreeType)."""
    return ImageFont.load_default(size=size)


def _text_width(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> int:
    left, _, right, _ = font.getbbox(text)
    return int(np.ceil(right - left))


def _draw_text(draw: ImageDraw.ImageDraw, position: tuple[int, int], text: str, font, font_size: int) -> None:
    """Draws `text` with its ink starting at `position` and fitting in `font_size` pixels of height."""
    left, top, _, _ = font.getbbox("Ag")
    draw.text((position[0] - left, position[1] - top), text, fill=_TEXT, font=font)


def _score_caption(name: str, scores: np.ndarray, width: int, font_size: int) -> Image.Image:
    return _caption([f"{name} (max {scores.max():.3f})"], width, font_size)


def _caption(lines: list[str], width: int, font_size: int) -> Image.Image:
    font = _font(font_size)
    pad = max(2, font_size // 3)
    line_height = font_size + pad
    width = max(width, max(_text_width(font, line) for line in lines) + 2 * pad)
    caption = Image.new("RGB", (width, pad + line_height * len(lines)), _BACKGROUND)
    draw = ImageDraw.Draw(caption)
    for index, line in enumerate(lines):
        _draw_text(draw, (pad, pad + index * line_height), line, font, font_size)
    return caption


def _stack(pictures: list[Image.Image]) -> Image.Image:
    """The pictures one below the other, left-aligned, on white."""
    stacked = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures)), _BACKGROUND)
    top = 0
    for picture in pictures:
        stacked.paste(picture, (0, top))
        top += picture.height
    return stacked


def _with_legend(
    picture: Image.Image,
    label_maps: list[Any],
    names: list[str],
    palette: np.ndarray,
    legend: LegendMode,
    ignore_index: int,
    font_size: int | None = None,
) -> Image.Image:
    if legend not in ("present", "all", "none"):
        raise ValueError(f"legend must be 'present', 'all' or 'none', got {legend!r}.")
    if legend == "none":
        return picture
    labels = (
        None if legend == "all" else classes_present(*label_maps, num_labels=len(names), ignore_index=ignore_index)
    )
    return _stack([picture, draw_legend(legend_entries(names, palette, labels), picture.width, font_size)])


def _scale_to_height(
    picture: Image.Image, height: int, resample: Image.Resampling = Image.Resampling.NEAREST
) -> Image.Image:
    if picture.height == height:
        return picture
    return picture.resize((max(1, round(picture.width * height / picture.height)), height), resample)


# ---------------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------------


def to_rgb_image(image: ImageLike) -> Image.Image:
    """`image` (a PIL image of any mode, or a `(height, width[, 3 or 4])` uint8 array) as an RGB PIL image, converted
    as `DenseClipImageProcessor` converts it (`image_to_rgb_array`: transparent images composited over white, 16-bit
    images scaled to 8 bits)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(
                f"An image array must be uint8 (0-255), got {image.dtype}: convert it, e.g. "
                "(array * 255).round().astype(np.uint8) for floats in [0, 1], or pass a PIL image."
            )
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(
                f"An image array must be (height, width, 3), (height, width, 4) or (height, width), got shape "
                f"{image.shape}: move the channels last."
            )
    elif not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image or a uint8 NumPy array, got {type(image).__name__}.")
    height, width = image.shape[:2] if isinstance(image, np.ndarray) else (image.height, image.width)
    if width == 0 or height == 0:
        raise ValueError(f"The image is empty ({width}x{height} pixels).")
    return Image.fromarray(image_to_rgb_array(image, input_data_format="channels_last", as_uint8=True))


def _array(values: Any, name: str) -> np.ndarray:
    """A NumPy array from a list, a NumPy array or a torch tensor."""
    return np.asarray(values) if isinstance(values, list | tuple) else to_numpy(values, name)


def _label_array(label_map: Any, num_labels: int, ignore_index: int) -> np.ndarray:
    """A `(height, width)` map of class ids in `0..num_labels-1` or `ignore_index` (`label_map_to_array`) as int64."""
    labels = label_map_to_array(label_map, "label_map")
    bad = np.unique(labels[((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)])
    if bad.size:
        raise ValueError(
            f"label_map holds {bad.size} value(s) that are no class id: {bad[:8].tolist()}; valid are 0.."
            f"{num_labels - 1} ({num_labels} classes) and the ignore index {ignore_index}. Reduced or unreduced "
            "ADE20K labels (do_reduce_labels) are a common cause."
        )
    return labels


def _float_array(values: Any, name: str) -> np.ndarray:
    array = to_numpy(values, name)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"{name} must be floating point (cosine similarities from outputs.score_map), got dtype {array.dtype}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values: the model's outputs are broken.")
    return array


def _score_array(score_map: Any, num_labels: int | None) -> np.ndarray:
    scores = _float_array(score_map, "score_map")
    if scores.ndim == 4:
        raise ValueError(
            f"score_map has shape {scores.shape}, a batch: pass one image's (num_labels, h, w) map, "
            "outputs.score_map[i] for image i."
        )
    if scores.ndim != 3 or 0 in scores.shape:
        raise ValueError(f"score_map must be one image's (num_labels, h, w) map, got shape {scores.shape}.")
    if num_labels is not None and len(scores) != num_labels:
        raise ValueError(
            f"score_map has {len(scores)} classes but id2label names {num_labels}: pass the config of the model "
            "that produced it."
        )
    return scores


def _class_names(id2label: ClassNames) -> list[str]:
    """`id2label` (a mapping with keys 0..n-1, ints or digit strings as in config.json, or a sequence) -> names."""
    if isinstance(id2label, Mapping):
        try:
            by_id = {int(key): str(name) for key, name in id2label.items()}
        except (TypeError, ValueError) as error:
            raise ValueError(f"id2label keys must be class ids 0..n-1, got {list(id2label)[:8]}.") from error
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"id2label keys must be the class ids 0..{len(by_id) - 1}, got {sorted(by_id)[:8]}...")
        names = [by_id[label] for label in range(len(by_id))]
    elif isinstance(id2label, Sequence) and not isinstance(id2label, str):
        names = [str(name) for name in id2label]
    else:
        raise TypeError(f"id2label must be a dict {{id: name}} or a list of names, got {type(id2label).__name__}.")
    if not names:
        raise ValueError("id2label is empty: a segmentation model has at least one class.")
    return names


def _class_index(names: list[str], class_: int | str) -> int:
    if isinstance(class_, str):
        if class_ not in names:
            raise ValueError(f"Unknown class {class_!r}: the model's classes are {names}.")
        return names.index(class_)
    if isinstance(class_, bool) or not isinstance(class_, int | np.integer):
        raise TypeError(f"A class is an id (int) or a name (str), got {type(class_).__name__} {class_!r}.")
    if not 0 <= class_ < len(names):
        raise ValueError(
            f"Class id {class_} is out of range: valid ids are 0..{len(names) - 1} ({len(names)} classes)."
        )
    return int(class_)


def _as_palette(palette: Any, num_labels: int | None) -> np.ndarray:
    array = np.asarray(palette) if isinstance(palette, list | tuple) else to_numpy(palette, "palette")
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"palette must be (num_labels, 3) RGB colours, got shape {array.shape}.")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"palette must hold numbers 0-255, got dtype {array.dtype}.")
    if array.size and (array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.round(array))):
        raise ValueError("palette colours must be integers in [0, 255] (RGB), e.g. [[120, 120, 120], ...].")
    if num_labels is not None and len(array) < num_labels:
        raise ValueError(f"palette has {len(array)} colours for {num_labels} classes: give one colour per class.")
    return array.astype(np.uint8)


def _palette_or_default(palette: Any, num_labels: int) -> np.ndarray:
    return default_palette(num_labels) if palette is None else _as_palette(palette, num_labels)


def _check_same_size(map_shape: tuple[int, ...], image_shape: tuple[int, ...], name: str) -> None:
    if tuple(map_shape) != tuple(image_shape):
        raise ValueError(
            f"{name} is {map_shape[0]}x{map_shape[1]} (height x width) but the image is {image_shape[0]}x"
            f"{image_shape[1]}: post-process at the image's size, post_process_semantic_segmentation(outputs, "
            "target_sizes=[image.size[::-1]])."
        )


def _check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}.")
    return float(alpha)


def _check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(value) for value in value_range)
    except (TypeError, ValueError) as error:
        raise TypeError(f"value_range must be a pair of numbers (low, high), got {value_range!r}.") from error
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"value_range must be finite numbers with low < high, got {value_range!r}.")
    return low, high


def _data_range(maps: list[np.ndarray]) -> tuple[float, float]:
    """The min and max over `maps`, widened by 1e-3 around a constant value."""
    low, high = float(min(m.min() for m in maps)), float(max(m.max() for m in maps))
    if high - low < 1e-6:
        return low - 1e-3, high + 1e-3
    return low, high


__all__ = [
    "HEATMAP_ANCHORS",
    "LegendEntry",
    "classes_present",
    "default_palette",
    "detection_grid",
    "draw_detections",
    "draw_color_bar",
    "draw_legend",
    "font_size_for",
    "heatmap_colors",
    "legend_entries",
    "palette_for",
    "prediction_grid",
    "save_figure",
    "score_map_figure",
    "score_map_grid",
    "score_map_overlay",
    "segmentation_figure",
    "segmentation_overlay",
    "to_rgb_image",
    "top_classes",
]
