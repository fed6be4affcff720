"""Pictures: overlay colours, legends, the heatmap colour ramp, score-map figures, grids, atomic saves, bad input."""

import colorsys
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from denseclip_hf import DenseClipConfig
from denseclip_hf.visualization import (
    HEATMAP_ANCHORS,
    classes_present,
    default_palette,
    draw_color_bar,
    draw_legend,
    font_size_for,
    heatmap_colors,
    legend_entries,
    palette_for,
    prediction_grid,
    save_figure,
    score_map_figure,
    score_map_grid,
    score_map_overlay,
    segmentation_figure,
    segmentation_overlay,
    top_classes,
)

NAMES = ["wall", "building", "sky", "traffic light"]
PALETTE = np.array([[200, 0, 0], [0, 160, 0], [0, 0, 220], [250, 250, 0]], dtype=np.uint8)


def noise_image(height: int = 6, width: int = 10, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def count_color(picture: Image.Image, color) -> int:
    return int((np.asarray(picture) == np.asarray(color, dtype=np.uint8)).all(axis=-1).sum())


def ramp(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The viridis ramp, computed with np.interp on the anchor positions (independent of `heatmap_colors`)."""
    t = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    positions = np.linspace(0, 1, len(HEATMAP_ANCHORS))
    return np.rint(np.stack([np.interp(t, positions, HEATMAP_ANCHORS[:, c]) for c in range(3)], -1)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# Colours
# ---------------------------------------------------------------------------------------------------------------------


def test_default_palette_is_golden_ratio_hues():
    palette = default_palette(150)
    assert palette.shape == (150, 3) and palette.dtype == np.uint8
    np.testing.assert_array_equal(palette, default_palette(150))
    for index in (0, 1, 2, 3, 7, 149):
        hue = index * (np.sqrt(5) - 1) / 2 % 1
        saturation = 0.9 if index // 2 % 2 == 0 else 0.6
        value = 1.0 if index % 2 == 0 else 0.75
        expected = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)]
        np.testing.assert_allclose(palette[index], expected, atol=1)
    assert len({tuple(color) for color in palette}) == 150
    assert default_palette(0).shape == (0, 3)


def test_palette_for_prefers_the_config_palette(config):
    np.testing.assert_array_equal(palette_for(config), default_palette(len(NAMES)))
    with_palette = DenseClipConfig(**{**config.to_dict(), "palette": PALETTE.tolist()})
    np.testing.assert_array_equal(palette_for(with_palette), PALETTE)


def test_heatmap_colors_at_known_points():
    low, high = -0.2, 0.6
    values = np.array([-1.0, -0.2, -0.1, 0.0, 0.2, 0.35, 0.5, 0.6, 3.0])
    colors = heatmap_colors(values, (low, high))
    np.testing.assert_array_equal(colors, ramp(np.clip(values, low, high), low, high))
    np.testing.assert_array_equal(colors[[0, 1, 4, 7, 8]], HEATMAP_ANCHORS[[0, 0, 2, 4, 4]])  # ends, middle, clipping
    np.testing.assert_array_equal(colors[2], np.rint((HEATMAP_ANCHORS[0] + HEATMAP_ANCHORS[1]) / 2))  # 1/8 of range
    assert heatmap_colors(np.zeros((2, 3, 4), np.float32), (-1, 1)).shape == (2, 3, 4, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Segmentation overlays, legends, grids
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 0.3, 1.0])
def test_overlay_colours(alpha):
    image = noise_image()
    labels = np.array([[0, 1, 2, 3, 255, 0, 1, 2, 3, 255]] * 6)
    overlay = np.asarray(segmentation_overlay(image, labels, PALETTE, alpha=alpha))
    pixels = np.asarray(image)
    assert overlay.shape == pixels.shape
    for y in range(6):
        for x in range(10):
            label = labels[y, x]
            if label == 255:
                expected = pixels[y, x]
            else:
                expected = [
                    round((1 - alpha) * float(p) + alpha * float(c))
                    for p, c in zip(pixels[y, x], PALETTE[label], strict=True)
                ]
            np.testing.assert_array_equal(overlay[y, x], expected)


def test_overlay_takes_tensors_and_palette_images():
    image = noise_image()
    labels = np.random.RandomState(1).randint(0, 4, (6, 10))
    expected = np.asarray(segmentation_overlay(image, labels, PALETTE))
    np.testing.assert_array_equal(np.asarray(segmentation_overlay(image, torch.from_numpy(labels), PALETTE)), expected)
    as_png = Image.fromarray(labels.astype(np.uint8), mode="L")
    np.testing.assert_array_equal(
        np.asarray(segmentation_overlay(np.asarray(image), as_png, PALETTE.tolist())), expected
    )


def test_legend_lists_present_or_all_classes():
    labels = np.array([[2, 2, 255], [0, 2, 255]])
    assert classes_present(labels, np.array([[0]]), num_labels=4) == [0, 2]
    entries = legend_entries(NAMES, PALETTE, [2, 0, 2])
    assert [(e.label, e.name, e.color) for e in entries] == [(0, "wall", (200, 0, 0)), (2, "sky", (0, 0, 220))]
    assert [e.name for e in legend_entries({1: "b", 0: "a"})] == ["a", "b"]
    assert [e.color for e in legend_entries(NAMES)] == [tuple(int(c) for c in color) for color in default_palette(4)]


@pytest.mark.parametrize("width", [16, 640, 2000])
def test_figure_with_legend(width):
    height = max(8, width // 2)
    image = noise_image(height, width)
    labels = np.zeros((height, width), dtype=np.int64)
    labels[:, width // 2 :] = 2
    labels[0, 0] = 255
    overlay = segmentation_overlay(image, labels, PALETTE)
    for legend, shown in (("present", [0, 2]), ("all", [0, 1, 2, 3])):
        figure = segmentation_figure(image, labels, NAMES, PALETTE, legend=legend)
        assert figure.height > height and figure.width >= width
        if width >= 640:
            assert figure.width == width  # the legend wraps inside the image's width
        np.testing.assert_array_equal(np.asarray(figure)[:height, :width], np.asarray(overlay))
        legend_part = figure.crop((0, height, figure.width, figure.height))
        swatch_interior = (font_size_for(width) - 2) ** 2  # readable: swatches and text grow with the picture
        for label in range(4):
            count = count_color(legend_part, PALETTE[label])
            assert (count >= swatch_interior) if label in shown else count == 0, (legend, label, count)
    assert segmentation_figure(image, labels, NAMES, PALETTE, legend="none").size == image.size


def test_legend_wraps_to_the_width():
    entries = legend_entries([f"class {i}" for i in range(30)])
    narrow, wide = draw_legend(entries, 200), draw_legend(entries, 1200, font_size=12)
    assert narrow.width == 200 and wide.width == 1200 and narrow.height > wide.height
    assert draw_legend([], 300).width == 300


def test_prediction_grid_tiles_and_legend():
    image = Image.new("RGB", (20, 10), (128, 128, 128))
    prediction = np.zeros((10, 20), dtype=np.int64)
    prediction[:, 15:] = 3
    truth = np.full((10, 20), 1)
    truth[:2] = 255
    grid = prediction_grid(
        [image, image], [prediction, prediction], NAMES, ground_truths=[truth, truth], palette=PALETTE, tile_height=40
    )
    assert grid.height > 2 * 40 and grid.width > 3 * 80
    scale = 4 * 4  # each tile is the overlay scaled 4x (nearest): 16 grid pixels per pixel

    def blended(label):
        return [round(0.5 * 128 + 0.5 * float(c)) for c in PALETTE[label]]

    assert count_color(grid, blended(0)) == 2 * 15 * 10 * scale
    assert count_color(grid, blended(3)) == 2 * 5 * 10 * scale
    assert count_color(grid, blended(1)) == 2 * 8 * 20 * scale
    for label, shown in ((0, True), (1, True), (2, False), (3, True)):  # legend swatches: the classes in any map
        assert (count_color(grid, PALETTE[label]) > 0) == shown, label
    without_truth = prediction_grid([image], [prediction], NAMES, palette=PALETTE, tile_height=40, legend="none")
    assert count_color(without_truth, blended(0)) == 15 * 10 * scale and without_truth.width < grid.width


# ---------------------------------------------------------------------------------------------------------------------
# Score maps
# ---------------------------------------------------------------------------------------------------------------------


def test_score_map_overlay_value_to_colour():
    image = noise_image(12, 16)
    grey = np.asarray(image.convert("L"), dtype=np.float64)[..., None]
    constant = np.full((3, 4), 0.25, dtype=np.float32)
    overlay = np.asarray(score_map_overlay(image, constant, value_range=(0.0, 1.0), alpha=0.6))
    expected = np.rint(0.4 * grey + 0.6 * HEATMAP_ANCHORS[1])
    np.testing.assert_allclose(overlay, np.broadcast_to(expected, overlay.shape), atol=1)
    pure = np.asarray(score_map_overlay(image, constant, value_range=(0.0, 1.0), alpha=1.0))
    assert (pure == HEATMAP_ANCHORS[1].astype(np.uint8)).all()


def test_score_map_overlay_resizes_like_the_post_processing():
    scores = torch.tensor([[[[0.1, -0.3, 0.2], [0.5, 0.0, -0.1]]]])
    resized = F.interpolate(scores, size=(8, 12), mode="bilinear", align_corners=False)[0, 0].numpy()
    overlay = np.asarray(score_map_overlay(noise_image(8, 12), scores[0, 0], value_range=(-0.3, 0.5), alpha=1.0))
    np.testing.assert_allclose(overlay.astype(int), ramp(resized, -0.3, 0.5).astype(int), atol=1)


def test_color_bar_spans_the_range():
    font_size = 12
    bar = np.asarray(draw_color_bar((-0.5, 0.5), 300, font_size))
    pad = max(2, font_size // 3)
    row = bar[pad + font_size // 2]
    np.testing.assert_array_equal(row[pad], HEATMAP_ANCHORS[0])
    np.testing.assert_array_equal(row[300 - pad - 1], HEATMAP_ANCHORS[-1])
    np.testing.assert_array_equal(row[pad : 300 - pad], ramp(np.linspace(-0.5, 0.5, 300 - 2 * pad), -0.5, 0.5))
    assert bar.shape[1] == 300 and draw_color_bar((0, 1), 10).width > 10  # wide enough for its numbers


def test_score_map_figure_and_grid():
    rng = np.random.RandomState(0)
    image = noise_image(48, 80)
    score_map = torch.from_numpy(rng.uniform(-0.5, 0.5, (4, 3, 5)).astype(np.float32)).to(torch.bfloat16)
    scores = score_map.float().numpy()
    figure = score_map_figure(image, score_map, NAMES, "sky")
    assert figure.width >= 80 and figure.height > 48
    expected = score_map_overlay(image, scores[2], value_range=(scores[2].min(), scores[2].max()))
    np.testing.assert_array_equal(np.asarray(figure)[:48, :80], np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(score_map_figure(image, score_map, NAMES, 2)), np.asarray(figure))

    peaks = scores.reshape(4, -1).max(axis=1)
    assert top_classes(score_map, 2) == sorted(range(4), key=lambda k: -peaks[k])[:2]
    grid = score_map_grid(image, score_map, NAMES, top_k=4, columns=2, tile_height=24)
    single = score_map_grid(image, score_map, NAMES, classes=["sky"], tile_height=24)
    assert grid.width > 2 * 40 and grid.height > 2 * 24 and single.width < grid.width
    shared = (scores[2].min(), scores[2].max())
    tile = score_map_overlay(image.resize((40, 24), Image.Resampling.BOX), scores[2], value_range=shared)
    np.testing.assert_array_equal(np.asarray(single)[:24, :40], np.asarray(tile))


# ---------------------------------------------------------------------------------------------------------------------
# Files and bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_save_figure_is_atomic(tmp_path, monkeypatch):
    figure = noise_image(20, 30)
    path = save_figure(figure, tmp_path / "new" / "figure.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(figure))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the permissions of any new file

    def crash(self, file, *args, **kwargs):
        file.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_figure(noise_image(5, 5), path)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(figure))
    assert sorted(p.name for p in path.parent.iterdir()) == ["figure.png"]
    with pytest.raises(ValueError, match="suffix"):
        save_figure(figure, tmp_path / "figure.unknown")


IMAGE, LABELS, SCORES = noise_image(), np.zeros((6, 10), dtype=np.int64), np.zeros((4, 2, 3), dtype=np.float32)

BAD_CALLS = {
    "label map of another size": (
        lambda: segmentation_overlay(IMAGE, np.zeros((10, 6), int), PALETTE),
        ValueError,
        "target_sizes",
    ),
    "label map batch": (
        lambda: segmentation_figure(IMAGE, np.stack([LABELS, LABELS]), NAMES),
        ValueError,
        "one map per image",
    ),
    "float label map": (
        lambda: segmentation_overlay(IMAGE, LABELS + 0.5, PALETTE),
        ValueError,
        "integer class ids.*not scores",
    ),
    "label out of range": (lambda: segmentation_figure(IMAGE, LABELS + 7, NAMES), ValueError, r"\[7\].*0\.\.3"),
    "negative label": (lambda: segmentation_overlay(IMAGE, LABELS - 1, PALETTE), ValueError, r"\[-1\]"),
    "short palette": (lambda: segmentation_figure(IMAGE, LABELS, NAMES, PALETTE[:2]), ValueError, "2 colours for 4"),
    "palette values": (lambda: segmentation_overlay(IMAGE, LABELS, [[300, 0, 0]]), ValueError, r"\[0, 255\]"),
    "float image": (lambda: segmentation_overlay(np.zeros((6, 10, 3)), LABELS, PALETTE), TypeError, "uint8"),
    "channels first": (
        lambda: segmentation_overlay(np.zeros((3, 6, 10), np.uint8), LABELS, PALETTE),
        ValueError,
        "channels last",
    ),
    "not an image": (lambda: segmentation_overlay("image.png", LABELS, PALETTE), TypeError, "PIL image"),
    "list label map": (
        lambda: segmentation_overlay(IMAGE, [[0]], PALETTE),
        TypeError,
        "NumPy array or a torch tensor",
    ),
    "alpha": (lambda: segmentation_overlay(IMAGE, LABELS, PALETTE, alpha=1.5), ValueError, r"\[0, 1\]"),
    "legend mode": (lambda: segmentation_figure(IMAGE, LABELS, NAMES, legend="some"), ValueError, "'present', 'all'"),
    "class id out of range": (lambda: score_map_figure(IMAGE, SCORES, NAMES, 4), ValueError, r"0\.\.3"),
    "unknown class name": (lambda: score_map_figure(IMAGE, SCORES, NAMES, "car"), ValueError, "'car'.*wall"),
    "class as float": (lambda: score_map_figure(IMAGE, SCORES, NAMES, 1.0), TypeError, "id \\(int\\) or a name"),
    "integer score map": (lambda: score_map_figure(IMAGE, SCORES.astype(int), NAMES, 0), TypeError, "floating point"),
    "batched score map": (lambda: score_map_grid(IMAGE, SCORES[None], NAMES), ValueError, r"score_map\[i\]"),
    "score map of another model": (lambda: score_map_figure(IMAGE, SCORES[:3], NAMES, 0), ValueError, "3 classes"),
    "nan scores": (lambda: score_map_overlay(IMAGE, np.full((2, 2), np.nan)), ValueError, "NaN"),
    "3-D class scores": (lambda: score_map_overlay(IMAGE, SCORES), ValueError, r"score_map\[i, k\]"),
    "empty range": (lambda: heatmap_colors(np.zeros(3), (0.5, 0.5)), ValueError, "low < high"),
    "range not numbers": (lambda: heatmap_colors(np.zeros(3), "ab"), TypeError, "pair of numbers"),
    "id2label keys": (lambda: legend_entries({1: "a", 2: "b"}), ValueError, "0..1"),
    "id2label type": (lambda: legend_entries("wall"), TypeError, "list of names"),
    "grid of no images": (lambda: prediction_grid([], [], NAMES), ValueError, "at least one image"),
    "grid count": (lambda: prediction_grid([IMAGE], [LABELS, LABELS], NAMES), ValueError, "1 images but 2"),
    "top_k": (lambda: top_classes(SCORES, 0), ValueError, "positive"),
    "tile height": (lambda: score_map_grid(IMAGE, SCORES, NAMES, tile_height=0), ValueError, "tile_height"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_gets_a_clear_error(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()
