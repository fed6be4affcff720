"""A procedurally generated outdoor-scene dataset that ships with the package (no download), for semantic segmentation
(label maps) and for object detection / instance segmentation (the objects' boxes and instance masks, COCO-style).

Every scene has a sky (with clouds) above a wavy horizon, ground made of grass, sand, water and a road, and objects
(trees, houses, cars, rocks) standing on the ground, drawn far-to-near so that near objects occlude far ones.
Colours are jittered per instance so that colour alone is ambiguous (sky and water are both blue, grass and trees both
green, car bodies take any hue): a model has to learn texture (waves, grass blades, bricks, speckles), shape and
context. Small unlabelled scribbles are marked with the ignore index, and the image gets a colour cast, noise and
sometimes blur. For detection, the painter records which object owns each pixel as it paints, so every object's mask
is what is left visible of it in the final image, and its box is the tight box of that mask.

Generation is deterministic: sample `i` of a split depends only on `(seed, split, i)`.
"""

from collections.abc import Callable
from functools import partial

import numpy as np
from datasets import ClassLabel, Dataset, Features, List, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw, ImageFilter

from .configuration_denseclip import IGNORE_INDEX

SYNTHETIC_CLASS_NAMES = ["sky", "cloud", "grass", "water", "sand", "road", "tree", "house", "car", "rock"]
SYNTHETIC_SPLIT_SIZES = {"train": 1000, "validation": 200}
SYNTHETIC_TASKS = ("segmentation", "detection")
# The detection classes: the objects the painter draws (`_OBJECT_PAINTERS`), in this order.
SYNTHETIC_DETECTION_CLASS_NAMES = ["tree", "house", "car", "rock"]
# Objects with less than this share of their painted pixels left visible are marked `iscrowd` (see
# `generate_detection_scene`).
CROWD_VISIBLE_FRACTION = 0.1

_SPLIT_IDS = {"train": 0, "validation": 1}
_CLASS = {name: label for label, name in enumerate(SYNTHETIC_CLASS_NAMES)}
_DETECTION_CLASS = {name: label for label, name in enumerate(SYNTHETIC_DETECTION_CLASS_NAMES)}


# ---------------------------------------------------------------------------------------------------------------------
# Colours and textures: each returns a full-canvas float RGB array (height, width, 3) in [0, 1]
# ---------------------------------------------------------------------------------------------------------------------


def hsv_color(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB `(3,)` in [0, 1] of a colour given by hue in degrees and saturation/value in [0, 1]."""
    image = Image.new("HSV", (1, 1), (int(hue % 360 / 360 * 255), int(saturation * 255), int(value * 255)))
    return np.asarray(image.convert("RGB"), dtype=np.float32)[0, 0] / 255


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: tuple[float, float]) -> np.ndarray:
    """Value noise `(height, width)`, zero mean, unit-ish amplitude; `cell` is the (height, width) of a noise cell."""
    height, width = shape
    grid = rng.standard_normal((max(2, int(height / cell[0]) + 2), max(2, int(width / cell[1]) + 2))).astype(
        np.float32
    )
    return np.asarray(Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC))


def _shade(color: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Multiplies `color` `(3,)` by `1 + pattern` `(height, width)` -> `(height, width, 3)` clipped to [0, 1]."""
    return np.clip(color[None, None] * (1 + pattern[..., None]), 0, 1)


def sky_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Vertical gradient from a deep to a pale blue (or grey when overcast), almost without texture."""
    overcast = rng.random() < 0.25
    hue = rng.uniform(195, 230)
    top = hsv_color(hue, rng.uniform(0.05, 0.2) if overcast else rng.uniform(0.45, 0.8), rng.uniform(0.6, 0.95))
    bottom = hsv_color(hue, rng.uniform(0.05, 0.15) if overcast else rng.uniform(0.15, 0.4), rng.uniform(0.8, 1.0))
    ramp = np.linspace(0, 1, shape[0], dtype=np.float32)[:, None, None]
    gradient = top * (1 - ramp) + bottom * ramp
    return np.clip(
        np.broadcast_to(gradient, (*shape, 3)) * (1 + 0.02 * smooth_noise(rng, shape, (16, 16))[..., None]), 0, 1
    )


def cloud_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """White to light grey with soft, puffy shading."""
    color = hsv_color(rng.uniform(0, 360), rng.uniform(0, 0.06), rng.uniform(0.85, 1.0))
    return _shade(color, 0.12 * smooth_noise(rng, shape, (6, 6)) - 0.05)


def grass_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Green with thin vertical blades (noise stretched vertically)."""
    color = hsv_color(rng.uniform(75, 145), rng.uniform(0.45, 0.85), rng.uniform(0.35, 0.75))
    blades = smooth_noise(rng, shape, (6, 0.7))
    return _shade(color, 0.25 * blades + 0.05 * smooth_noise(rng, shape, (12, 12)))


def water_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Blue to teal with horizontal waves and bright glints."""
    color = hsv_color(rng.uniform(180, 225), rng.uniform(0.45, 0.85), rng.uniform(0.4, 0.8))
    rows = np.arange(shape[0], dtype=np.float32)[:, None]
    wobble = 2.0 * smooth_noise(rng, shape, (8, 10))
    waves = np.sin(2 * np.pi * (rows + wobble) / rng.uniform(3.0, 6.0) + rng.uniform(0, 2 * np.pi))
    glints = (rng.random(shape) < 0.01) * 0.6
    return _shade(color, 0.22 * waves + glints)


def sand_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Beige to yellow with a fine speckle."""
    color = hsv_color(rng.uniform(30, 55), rng.uniform(0.25, 0.55), rng.uniform(0.65, 0.92))
    return _shade(
        color, 0.12 * rng.standard_normal(shape).astype(np.float32) + 0.05 * smooth_noise(rng, shape, (10, 10))
    )


def road_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Dark asphalt grey with a fine grain."""
    color = hsv_color(rng.uniform(0, 360), rng.uniform(0, 0.08), rng.uniform(0.18, 0.42))
    return _shade(color, 0.08 * rng.standard_normal(shape).astype(np.float32))


def foliage_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Dark green leaves: coarse high-contrast blotches."""
    color = hsv_color(rng.uniform(80, 150), rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.5))
    return _shade(color, 0.45 * smooth_noise(rng, shape, (2.5, 2.5)))


def brick_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Red, orange or beige bricks in staggered rows separated by light mortar."""
    color = hsv_color(rng.uniform(0, 45), rng.uniform(0.3, 0.8), rng.uniform(0.45, 0.85))
    brick_height, brick_width = int(rng.integers(3, 6)), int(rng.integers(6, 11))
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    course = rows // brick_height
    mortar = (rows % brick_height == 0) | ((cols + (course % 2) * brick_width // 2) % brick_width == 0)
    per_brick = 0.1 * rng.standard_normal((shape[0] // brick_height + 1, shape[1] // brick_width + 2))
    pattern = per_brick[course, (cols + (course % 2) * brick_width // 2) // brick_width].astype(np.float32)
    return np.where(mortar[..., None], np.float32(0.85), _shade(color, pattern))


def rock_texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Grey or brownish stone, lit from the top left, with darker cracks."""
    color = hsv_color(rng.uniform(20, 50), rng.uniform(0, 0.25), rng.uniform(0.35, 0.65))
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    light = -0.4 * (rows / shape[0] + cols / shape[1] - 1)
    cracks = -0.5 * (np.abs(smooth_noise(rng, shape, (5, 5))) < 0.08)
    return _shade(color, light + cracks + 0.1 * smooth_noise(rng, shape, (3, 3)))


def streaked_texture(
    rng: np.random.Generator, color: np.ndarray, cell: tuple[float, float], shape: tuple[int, int]
) -> np.ndarray:
    """`color` `(3,)` with mild noise stretched along `cell` (bark, roof tiles)."""
    return _shade(color, 0.1 * smooth_noise(rng, shape, cell))


def glossy_texture(color: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`color` `(3,)` brighter at the top than at the bottom (car paint)."""
    return _shade(color, np.broadcast_to(np.linspace(0.08, -0.08, shape[0], dtype=np.float32)[:, None], shape))


def flat_texture(color: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A uniform colour `(3,)`."""
    return np.broadcast_to(color, (*shape, 3)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Scene
# ---------------------------------------------------------------------------------------------------------------------


class _Canvas:
    """An RGB image and its label map that shapes are painted onto, later shapes over earlier ones."""

    def __init__(self, size: int):
        self.size = size
        self.shape = (size, size)
        self.image = np.zeros((size, size, 3), dtype=np.float32)
        self.label = np.full((size, size), IGNORE_INDEX, dtype=np.uint8)
        # Which object owns each pixel (0: none): `paint` writes `instance_id`, which `_paint_objects` sets to the
        # object being painted and back to 0 after it, so later paint (nearer objects, clutter) occludes earlier.
        self.instance = np.zeros((size, size), dtype=np.int32)
        self.instance_id = 0

    def paint(self, mask: np.ndarray, texture: Callable[[tuple[int, int]], np.ndarray], label: int) -> None:
        """Paints where the boolean `mask` `(size, size)` is set, labelled `label` and owned by `instance_id`.
        `texture(shape)` returns the `(height, width, 3)` colours of the mask's bounding box; it is not called for an
        empty mask."""
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size == 0:
            return
        box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        local = mask[box]
        np.copyto(self.image[box], texture(local.shape), where=local[..., None])
        np.copyto(self.label[box], np.uint8(label), where=local)
        np.copyto(self.instance[box], np.int32(self.instance_id), where=local)

    def mask(self, draw: str, *args, **kwargs) -> np.ndarray:
        """Boolean mask of one `ImageDraw` primitive (`"polygon"`, `"ellipse"`, `"rectangle"`, `"line"`)."""
        layer = Image.new("L", (self.size, self.size), 0)
        getattr(ImageDraw.Draw(layer), draw)(*args, fill=255, **kwargs)
        return np.asarray(layer) > 0


def _wavy_line(rng: np.random.Generator, length: int, base: float, amplitude: float) -> np.ndarray:
    """`length` positions around `base` following two random sines."""
    x = np.arange(length, dtype=np.float32) / length
    waves = sum(
        rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * (rng.uniform(0.5, 3.0) * x + rng.uniform(0, 1))) for _ in range(2)
    )
    return base + amplitude * waves / 2


def _paint_background(canvas: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Sky, clouds and the ground zones; returns the horizon row of every column `(size,)`."""
    size, shape = canvas.size, canvas.shape
    rows = np.arange(size)[:, None]
    horizon = _wavy_line(rng, size, rng.uniform(0.3, 0.55) * size, rng.uniform(0.02, 0.08) * size)
    canvas.paint(rows < horizon[None], partial(sky_texture, rng), _CLASS["sky"])
    for _ in range(rng.integers(0, 4)):
        center = rng.uniform(0, size), rng.uniform(0.05, 0.3) * size
        cloud = np.zeros(shape, dtype=bool)
        for _ in range(rng.integers(2, 5)):
            x, y = center[0] + rng.normal(0, 0.06 * size), center[1] + rng.normal(0, 0.02 * size)
            rx, ry = rng.uniform(0.04, 0.1) * size, rng.uniform(0.025, 0.05) * size
            cloud |= canvas.mask("ellipse", [x - rx, y - ry, x + rx, y + ry])
        canvas.paint(cloud & (rows < horizon[None]), partial(cloud_texture, rng), _CLASS["cloud"])

    # Ground: 1-3 zones from left to right with wavy vertical borders, the first one possibly cut by a far shore.
    ground = rows >= horizon[None]
    materials = rng.choice([_CLASS["grass"], _CLASS["water"], _CLASS["sand"]], size=rng.integers(1, 4))
    borders = np.sort(rng.uniform(0.2, 0.8, size=len(materials) - 1)) * size
    cols = np.arange(size)[None, :]
    zone = np.zeros(shape, dtype=np.int64)
    for border in borders:
        zone += cols >= _wavy_line(rng, size, border, 0.05 * size)[:, None]
    textures = {_CLASS["grass"]: grass_texture, _CLASS["water"]: water_texture, _CLASS["sand"]: sand_texture}
    for index, material in enumerate(materials):
        canvas.paint(ground & (zone == index), partial(textures[int(material)], rng), int(material))
    if rng.random() < 0.6:
        _paint_road(canvas, rng, horizon)
    return horizon


def _paint_road(canvas: _Canvas, rng: np.random.Generator, horizon: np.ndarray) -> None:
    """A road narrowing towards the horizon, with a dashed centre line (part of the road)."""
    size = canvas.size
    top_x, bottom_x = rng.uniform(0.2, 0.8) * size, rng.uniform(0, 1) * size
    top_y = float(horizon[int(np.clip(top_x, 0, size - 1))]) + 1
    top_half, bottom_half = rng.uniform(0.01, 0.04) * size, rng.uniform(0.15, 0.35) * size
    road = canvas.mask(
        "polygon",
        [
            (top_x - top_half, top_y),
            (top_x + top_half, top_y),
            (bottom_x + bottom_half, size),
            (bottom_x - bottom_half, size),
        ],
    )
    canvas.paint(road, partial(road_texture, rng), _CLASS["road"])
    line_color = hsv_color(rng.choice([50.0, 0.0]), rng.uniform(0, 0.8), 0.95)
    for start in np.arange(0, 1, 0.2) + rng.uniform(0, 0.1):
        t0, t1 = start, start + 0.08
        points = [(top_x + t * (bottom_x - top_x), top_y + t * (size - top_y)) for t in (t0, t1)]
        dash = canvas.mask("line", points, width=max(1, int(1 + 2 * t0)))
        canvas.paint(dash & road, partial(flat_texture, line_color), _CLASS["road"])


def _paint_tree(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, scale: float) -> None:
    trunk_color = hsv_color(rng.uniform(15, 35), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.4))
    width, height = 0.12 * scale, 0.45 * scale
    trunk = canvas.mask("rectangle", [x - width / 2, base - height, x + width / 2, base])
    canvas.paint(trunk, partial(streaked_texture, rng, trunk_color, (4, 1)), _CLASS["tree"])
    crown = np.zeros(canvas.shape, dtype=bool)
    for _ in range(rng.integers(3, 6)):
        cx, cy = x + rng.normal(0, 0.15 * scale), base - height - rng.uniform(0.1, 0.45) * scale
        radius = rng.uniform(0.18, 0.32) * scale
        crown |= canvas.mask("ellipse", [cx - radius, cy - radius, cx + radius, cy + radius])
    canvas.paint(crown, partial(foliage_texture, rng), _CLASS["tree"])


def _paint_house(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, scale: float) -> None:
    width, height = rng.uniform(0.7, 1.2) * scale, rng.uniform(0.5, 0.8) * scale
    left, top = x - width / 2, base - height
    canvas.paint(
        canvas.mask("rectangle", [left, top, left + width, base]), partial(brick_texture, rng), _CLASS["house"]
    )
    roof_color = hsv_color(rng.uniform(0, 360), rng.uniform(0.2, 0.6), rng.uniform(0.15, 0.4))
    roof = canvas.mask("polygon", [(left - 0.1 * width, top), (x, top - 0.4 * height), (left + 1.1 * width, top)])
    canvas.paint(roof, partial(streaked_texture, rng, roof_color, (2, 6)), _CLASS["house"])
    window_color = hsv_color(rng.choice([55.0, 200.0]), rng.uniform(0.2, 0.6), rng.uniform(0.7, 1.0))
    pane = 0.15 * min(width, height)
    for column in range(int(rng.integers(1, 4))):
        wx = left + (column + 0.5) * width / 3 - pane / 2
        window = canvas.mask("rectangle", [wx, top + 0.2 * height, wx + pane, top + 0.2 * height + pane])
        canvas.paint(window, partial(flat_texture, window_color), _CLASS["house"])


def _paint_car(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, scale: float) -> None:
    body_color = hsv_color(rng.uniform(0, 360), rng.uniform(0.5, 1.0), rng.uniform(0.4, 0.95))
    length, height = rng.uniform(0.9, 1.3) * scale, 0.28 * scale
    wheel = 0.12 * scale
    left, bottom = x - length / 2, base - wheel
    body = canvas.mask("rounded_rectangle", [left, bottom - height, left + length, bottom], radius=0.3 * height)
    cabin = canvas.mask(
        "polygon",
        [
            (left + 0.2 * length, bottom - height),
            (left + 0.32 * length, bottom - 1.9 * height),
            (left + 0.7 * length, bottom - 1.9 * height),
            (left + 0.82 * length, bottom - height),
        ],
    )
    canvas.paint(body | cabin, partial(glossy_texture, body_color), _CLASS["car"])
    glass = canvas.mask(
        "polygon",
        [
            (left + 0.3 * length, bottom - 1.1 * height),
            (left + 0.36 * length, bottom - 1.75 * height),
            (left + 0.66 * length, bottom - 1.75 * height),
            (left + 0.74 * length, bottom - 1.1 * height),
        ],
    )
    canvas.paint(glass, partial(flat_texture, hsv_color(205, 0.25, 0.85)), _CLASS["car"])
    for wx in (left + 0.22 * length, left + 0.78 * length):
        tyre = canvas.mask("ellipse", [wx - wheel, base - 2 * wheel, wx + wheel, base])
        canvas.paint(tyre, partial(flat_texture, hsv_color(0, 0, 0.08)), _CLASS["car"])


def _paint_rock(canvas: _Canvas, rng: np.random.Generator, x: float, base: float, scale: float) -> None:
    radius = rng.uniform(0.35, 0.6) * scale
    angles = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(6, 10))))
    radii = radius * rng.uniform(0.7, 1.1, size=angles.size)
    points = [
        (x + r * np.cos(a), base - radius * 0.6 + 0.6 * r * np.sin(a)) for a, r in zip(angles, radii, strict=True)
    ]
    canvas.paint(canvas.mask("polygon", points), partial(rock_texture, rng), _CLASS["rock"])


_OBJECT_PAINTERS = {"tree": _paint_tree, "house": _paint_house, "car": _paint_car, "rock": _paint_rock}


def _paint_objects(canvas: _Canvas, rng: np.random.Generator, horizon: np.ndarray) -> list[tuple[str, int]]:
    """2-7 objects standing on the ground, drawn from far (near the horizon) to near, so near ones occlude. Object `k`
    owns the pixels where `canvas.instance == k + 1`; returns each object's kind and its pixel count right after it
    was painted (before nearer objects covered parts of it)."""
    size = canvas.size
    count = int(rng.integers(2, 8))
    kinds = rng.choice(list(_OBJECT_PAINTERS), size=count)
    xs = rng.uniform(-0.05, 1.05, size=count) * size
    depth = np.sort(rng.uniform(0, 1, size=count))
    painted = []
    for number, (kind, x, near) in enumerate(zip(kinds, xs, depth, strict=True), start=1):
        ground_top = float(horizon[int(np.clip(x, 0, size - 1))])
        base = ground_top + (0.05 + 0.95 * near) * (size - ground_top)
        scale = (0.12 + 0.35 * near) * size
        canvas.instance_id = number
        _OBJECT_PAINTERS[kind](canvas, rng, float(x), base, scale)
        painted.append((str(kind), int(np.count_nonzero(canvas.instance == number))))
    canvas.instance_id = 0
    return painted


def _paint_clutter(canvas: _Canvas, rng: np.random.Generator) -> None:
    """0-3 thin unlabelled scribbles of random colour (label `IGNORE_INDEX`)."""
    for _ in range(rng.integers(0, 4)):
        start = rng.uniform(0, canvas.size, size=2)
        points = [tuple(start + rng.normal(0, 0.12 * canvas.size, size=2) * step) for step in range(3)]
        scribble = canvas.mask("line", points, width=int(rng.integers(1, 3)))
        color = hsv_color(rng.uniform(0, 360), rng.uniform(0, 1), rng.uniform(0, 1))
        canvas.paint(scribble, partial(flat_texture, color), IGNORE_INDEX)


def _camera(image: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Exposure, colour cast, sensor noise and sometimes blur: float `(size, size, 3)` -> PIL RGB."""
    gain = rng.uniform(0.75, 1.2) * rng.uniform(0.92, 1.08, size=3)
    image = image * gain + rng.uniform(-0.06, 0.06)
    image = image + rng.uniform(0.01, 0.05) * rng.standard_normal(image.shape)
    result = Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))
    if rng.random() < 0.3:
        result = result.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.9)))
    return result


def _render(seed: int | list[int], size: int) -> tuple[Image.Image, _Canvas, list[tuple[str, int]]]:
    """The camera image of a scene, its canvas (label and instance maps) and its objects (see `_paint_objects`)."""
    rng = np.random.default_rng(seed)
    canvas = _Canvas(size)
    horizon = _paint_background(canvas, rng)
    objects = _paint_objects(canvas, rng, horizon)
    _paint_clutter(canvas, rng)
    return _camera(canvas.image, rng), canvas, objects


def generate_scene(seed: int | list[int], size: int = 128) -> tuple[Image.Image, Image.Image]:
    """One scene: an RGB image and its `L` label map (class ids of `SYNTHETIC_CLASS_NAMES`, 255 = unlabelled),
    both `size` x `size`. The same `seed` always gives the same scene."""
    image, canvas, _ = _render(seed, size)
    return image, Image.fromarray(canvas.label, mode="L")


def generate_detection_scene(seed: int | list[int], size: int = 128) -> tuple[Image.Image, list[dict]]:
    """One scene (the same image as `generate_scene(seed, size)`) and its objects, nearest last.

    Each object is `{"category": index into SYNTHETIC_DETECTION_CLASS_NAMES, "mask": (size, size) bool, "iscrowd":
    0 | 1}`: the mask holds the pixels of the object left visible in the final image (nearer objects and clutter
    painted over it are taken out). Objects without a visible pixel are left out; objects with less than
    `CROWD_VISIBLE_FRACTION` of their painted pixels visible are marked `iscrowd` 1, so that COCO evaluation ignores
    them (as it does COCO's crowd regions) and training skips them.
    """
    image, canvas, painted = _render(seed, size)
    objects = []
    for number, (kind, painted_pixels) in enumerate(painted, start=1):
        mask = canvas.instance == number
        visible = int(np.count_nonzero(mask))
        if visible:
            crowd = int(visible < CROWD_VISIBLE_FRACTION * painted_pixels)
            objects.append({"category": _DETECTION_CLASS[kind], "mask": mask, "iscrowd": crowd})
    return image, objects


def detection_features(class_names: list[str] | tuple[str, ...]) -> Features:
    """The features of every detection dataset of the package (the synthetic scenes, COCO folders, Hub datasets),
    those of the Hub's COCO-style detection datasets: `image`, `image_id` (int64), `width`, `height` (int64) and
    `objects`, a dict of per-object lists (the Hub's convention; `example["objects"]["bbox"][i]` is object `i`'s box):

    - `id` (int64): the annotation id;
    - `bbox` (4 x float32): `[x, y, width, height]` in pixels, COCO's convention (x, y: top-left corner);
    - `category` (`ClassLabel` with `class_names`): the contiguous class index 0..K-1;
    - `area` (float32): the object's area in pixels (COCO's: of its mask);
    - `iscrowd` (int64): 1 for a crowd region (ignored by COCO evaluation, skipped by training), else 0;
    - `segmentation`: the mask as compressed COCO RLE `{"size": [height, width], "counts": str}` (what
      `pycocotools.mask.encode` gives, counts decoded to str), or `None` without a mask. COCO polygons and
      uncompressed RLE are converted to it when loading (`pycocotools.mask.frPyObjects` + `merge`, what COCO's own
      `annToRLE` does), so one Arrow type holds every mask.
    """
    return Features(
        {
            "image": ImageFeature(),
            "image_id": Value("int64"),
            "width": Value("int64"),
            "height": Value("int64"),
            "objects": {
                "id": List(Value("int64")),
                "bbox": List(List(Value("float32"), length=4)),
                "category": List(ClassLabel(names=list(class_names))),
                "area": List(Value("float32")),
                "iscrowd": List(Value("int64")),
                "segmentation": List({"size": List(Value("int64"), length=2), "counts": Value("string")}),
            },
        }
    )


def encode_mask(mask: np.ndarray) -> dict:
    """A boolean `(height, width)` mask -> compressed COCO RLE `{"size": [height, width], "counts": str}`
    (`pycocotools.mask.encode`, counts decoded to str as COCO json files and the authors' results files hold it)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _detection_columns(split: str, num_samples: int, image_size: int, seed: int) -> dict[str, list]:
    """The columns of `detection_features` for scenes `0..num_samples-1` of `split`; boxes and areas from the RLE of
    each visible mask (`pycocotools.mask.toBbox` / `area`: the tight box of the pixels, COCO's convention)."""
    from pycocotools import mask as mask_utils

    columns = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    next_id = 1
    for index in range(num_samples):
        image, objects = generate_detection_scene([seed, _SPLIT_IDS[split], index], image_size)
        rles = [encode_mask(obj["mask"]) for obj in objects]
        boxes = mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))
        columns["image"].append(image)
        columns["image_id"].append(index)
        columns["width"].append(image_size)
        columns["height"].append(image_size)
        columns["objects"].append(
            {
                "id": list(range(next_id, next_id + len(objects))),
                "bbox": boxes.tolist(),
                "category": [obj["category"] for obj in objects],
                "area": [float(area) for area in mask_utils.area(rles)] if rles else [],
                "iscrowd": [obj["iscrowd"] for obj in objects],
                "segmentation": rles,
            }
        )
        next_id += len(objects)
    return columns


def synthetic_features() -> Features:
    """`image` (RGB), `label` (label map, `L`), `classes` (the classes present, with their names)."""
    return Features(
        {"image": ImageFeature(), "label": ImageFeature(), "classes": List(ClassLabel(names=SYNTHETIC_CLASS_NAMES))}
    )


def load_synthetic_dataset(
    split: str = "train",
    num_samples: int | None = None,
    image_size: int = 128,
    seed: int = 0,
    task: str = "segmentation",
) -> Dataset:
    """The synthetic scene dataset as a `datasets.Dataset`, generated in memory (about 5 ms a scene).

    Args:
        split: `"train"` (1000 scenes) or `"validation"` (200 scenes); the two never share a scene.
        num_samples: Number of scenes, defaults to the split's size.
        image_size: Side of the square scenes in pixels.
        seed: Base seed; scene `i` of a split is a function of `(seed, split, i)` only.
        task: `"segmentation"` (label maps) or `"detection"` (boxes and instance masks of the same scenes).

    Returns:
        For `"segmentation"`, a `Dataset` with columns `image` (PIL RGB), `label` (PIL `L` map of class ids, 255 =
        unlabelled) and `classes` (ids of the classes present); class names:
        `dataset.features["classes"].feature.names`. For `"detection"`, the COCO-style columns of
        `detection_features` (`image`, `image_id` = the scene's index, `width`, `height`, `objects`) with the objects
        of `generate_detection_scene` (classes `SYNTHETIC_DETECTION_CLASS_NAMES`; masks as RLE, boxes and areas
        from the masks, annotation ids counting from 1 over the split).
    """
    if split not in _SPLIT_IDS:
        raise ValueError(f"Unknown synthetic split {split!r}: use one of {list(_SPLIT_IDS)}.")
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"Unknown synthetic task {task!r}: use one of {list(SYNTHETIC_TASKS)}.")
    num_samples = SYNTHETIC_SPLIT_SIZES[split] if num_samples is None else num_samples
    if task == "detection":
        columns = _detection_columns(split, num_samples, image_size, seed)
        return Dataset.from_dict(columns, features=detection_features(SYNTHETIC_DETECTION_CLASS_NAMES), split=split)
    columns = {"image": [], "label": [], "classes": []}
    for index in range(num_samples):
        image, label = generate_scene([seed, _SPLIT_IDS[split], index], image_size)
        columns["image"].append(image)
        columns["label"].append(label)
        columns["classes"].append(sorted(set(np.unique(np.asarray(label)).tolist()) - {IGNORE_INDEX}))
    return Dataset.from_dict(columns, features=synthetic_features(), split=split)


__all__ = [
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_DETECTION_CLASS_NAMES",
    "detection_features",
    "encode_mask",
    "generate_detection_scene",
    "generate_scene",
    "load_synthetic_dataset",
]
