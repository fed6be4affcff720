"""Pictures of a training run's predictions: a PNG grid of validation images with ground-truth and prediction overlays
(Pillow only)."""

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TILE_HEIGHT = 160
_GAP = 4
_HEADER_HEIGHT = 18
_LEGEND_COLUMNS = 4
_LEGEND_ROW_HEIGHT = 16


def color_palette(num_colors: int) -> np.ndarray:
    """`(num_colors, 3)` uint8 distinct colours: golden-ratio hues, alternating saturation and brightness."""
    hsv = [
        (int(255 * (index * 0.618034 % 1.0)), 255 - 70 * (index // 2 % 2), 255 - 60 * (index % 2))
        for index in range(num_colors)
    ]
    return np.asarray(Image.fromarray(np.asarray([hsv], dtype=np.uint8), mode="HSV").convert("RGB"))[0]


def overlay(image: np.ndarray, label_map: np.ndarray, palette: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blends class colours over `image` `(H, W, 3)` uint8 where `label_map` `(H, W)` holds a class id; pixels with
    other values (ignored) keep the image."""
    labelled = (label_map >= 0) & (label_map < len(palette))
    colors = palette[np.where(labelled, label_map, 0)].astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colors
    return np.where(labelled[..., None], blended, image).astype(np.uint8)


def _tile(array: np.ndarray) -> Image.Image:
    image = Image.fromarray(array)
    width = max(1, round(image.width * TILE_HEIGHT / image.height))
    return image.resize((width, TILE_HEIGHT), Image.Resampling.NEAREST)


def save_prediction_grid(
    images: list[Image.Image],
    labels: list[np.ndarray],
    predictions: list[np.ndarray],
    id2label: dict[int, str],
    path: str | Path,
) -> None:
    """Saves a PNG with one row per image: the image, its ground truth overlay and the prediction overlay.

    `labels` and `predictions` are `(H, W)` class-id maps of each image's size; a legend names the classes shown.
    """
    palette = color_palette(len(id2label))
    rows = []
    for image, label, prediction in zip(images, labels, predictions, strict=True):
        pixels = np.asarray(image.convert("RGB"))
        rows.append(
            [_tile(pixels), _tile(overlay(pixels, label, palette)), _tile(overlay(pixels, prediction, palette))]
        )
    column_widths = [max(row[column].width for row in rows) for column in range(3)]
    shown = sorted({int(v) for array in (*labels, *predictions) for v in np.unique(array) if 0 <= v < len(id2label)})
    legend_top = _HEADER_HEIGHT + len(rows) * (TILE_HEIGHT + _GAP)
    width = sum(column_widths) + _GAP * 4
    height = legend_top + _LEGEND_ROW_HEIGHT * math.ceil(len(shown) / _LEGEND_COLUMNS) + _GAP
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, title in enumerate(("image", "ground truth", "prediction")):
        draw.text((_GAP + sum(column_widths[:column]) + column * _GAP, 3), title, fill="black", font=font)
    for row_index, row in enumerate(rows):
        for column, tile in enumerate(row):
            x = _GAP + sum(column_widths[:column]) + column * _GAP
            grid.paste(tile, (x, _HEADER_HEIGHT + row_index * (TILE_HEIGHT + _GAP)))
    legend_width = (width - _GAP) // _LEGEND_COLUMNS
    for position, label in enumerate(shown):
        x = _GAP + (position % _LEGEND_COLUMNS) * legend_width
        y = legend_top + (position // _LEGEND_COLUMNS) * _LEGEND_ROW_HEIGHT
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in palette[label]))
        draw.text((x + 14, y + 1), id2label[label], fill="black", font=font)
    grid.save(path)


__all__ = ["color_palette", "overlay", "save_prediction_grid"]
