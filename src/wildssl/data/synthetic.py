"""Synthetic scenes: the embedded, download-free data set of the demo and the tests.

Each scene has one large *main* object whose **shape is the class label**, 1-3 small distractor objects of
random shapes that never touch it, random colours for everything (colour is drawn independently of the
shape, so it cannot predict the class) and a background of a random colour with a mild linear gradient
and pixel noise. Every scene is a pure function of ``(seed, split, index)``: rendering is lazy, so
``source[i]`` is identical in every process and run, and nothing but the small per-index random state
is ever computed twice.

Geometry lives in normalized coordinates; rendering rasterizes it at ``size`` pixels, so the same scene
can be drawn at any resolution and its boxes stay exact.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from wildssl.data.sample import Source, make_sample
from wildssl.errors import DataError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond", "star", "hourglass")

# Named colours: captions use the names, renders jitter the values. Entries are far enough apart
# (>= ~100 in RGB) that an object never disappears into a background of another entry.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 40, 40)),
    ("green", (40, 170, 60)),
    ("blue", (40, 80, 220)),
    ("yellow", (235, 210, 40)),
    ("orange", (240, 140, 30)),
    ("purple", (130, 60, 180)),
    ("pink", (240, 130, 180)),
    ("cyan", (40, 200, 210)),
    ("brown", (130, 80, 40)),
    ("white", (240, 240, 240)),
    ("black", (20, 20, 20)),
    ("gray", (128, 128, 128)),
)

MAIN_SIDE = (0.35, 0.60)  # side of the main object, fraction of the image side
DISTRACTOR_SIDE = (0.12, 0.20)
MAX_ASPECT = 1.25  # per-object width/height stretch, in [1/MAX_ASPECT, MAX_ASPECT]
COLOUR_JITTER = 20  # per channel, on every object and the background
GRADIENT = 30.0  # largest colour change across the background
NOISE = 6  # uniform integer pixel noise in [-NOISE, NOISE] over the whole image
# The most rendered pixels the synthetic sources of one process keep in memory (uint8 bytes).
RENDER_CACHE_BYTES = 256 * 2**20
SPLITS = ("train", "test")
_PLACEMENT_TRIES = 12
_GAP = 0.02  # smallest distance between two objects' boxes


@dataclass(frozen=True)
class SceneObject:
    """One object: shape index into ``SHAPES``, palette index, jittered RGB and normalized box."""

    shape: int
    colour: int
    rgb: tuple[int, int, int]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in [0, 1]


@dataclass(frozen=True)
class Scene:
    """Everything needed to render a scene; ``objects[0]`` is the main object."""

    objects: tuple[SceneObject, ...]
    background: int
    background_rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # colour change per unit of x and of y
    noise_seed: int


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Membership of local coordinates ``x, y`` (box = [-1, 1]^2, y pointing down) in a shape that
    touches all four sides of its box (so the box is tight)."""
    if shape == "circle":
        return x * x + y * y <= 1.0
    if shape == "square":
        return (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)
    if shape == "triangle":  # apex up, base on the bottom side
        return (y <= 1.0) & (np.abs(x) <= (y + 1.0) / 2.0)
    if shape == "cross":
        inside = (np.abs(x) <= 1.0) & (np.abs(y) <= 1.0)
        return inside & ((np.abs(x) <= 0.34) | (np.abs(y) <= 0.34))
    if shape == "ring":
        radius2 = x * x + y * y
        return (radius2 <= 1.0) & (radius2 >= 0.55**2)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "hourglass":
        return (np.abs(y) <= 1.0) & (np.abs(x) <= np.abs(y))
    if shape == "star":
        return _star_mask(x, y)
    raise ValueError(f"unknown shape {shape!r}")


def _star_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five-pointed star, apex up, inner/outer radius 0.5. A unit star spans x in [-cos 18deg, cos 18deg]
    and y in [-1, sin 54deg]; the box coordinates are first mapped onto that span so the star is tight."""
    outer_x, outer_bottom = np.cos(np.pi / 10), np.sin(3 * np.pi / 10)
    sx = x * outer_x
    sy = -1.0 + (y + 1.0) * (1.0 + outer_bottom) / 2.0
    radius = np.sqrt(sx * sx + sy * sy)
    sector = 2 * np.pi / 5
    half = sector / 2
    # angle from the apex, folded to the angular distance from the nearest outer vertex
    angle = np.mod(np.arctan2(sy, sx) + np.pi / 2, sector)
    from_tip = half - np.abs(angle - half)
    inner = 0.5
    # distance along the ray to the edge joining an outer vertex (radius 1, angle 0) and an inner one
    # (radius `inner`, angle `half`): r = R1 R2 sin(d) / (R1 sin(t) + R2 sin(d - t))
    edge = inner * np.sin(half) / (np.sin(from_tip) + inner * np.sin(half - from_tip))
    return radius <= edge


def _jittered(rgb: tuple[int, int, int], draws: list[float]) -> tuple[int, int, int]:
    """``rgb`` moved by up to COLOUR_JITTER per channel, from three uniform draws in [0, 1)."""
    return tuple(
        min(max(c + int(d * (2 * COLOUR_JITTER + 1)) - COLOUR_JITTER, 0), 255) for c, d in zip(rgb, draws)
    )


def _box(side_range: tuple[float, float], draws: list[float]) -> tuple[float, float, float, float]:
    """A box fully inside the image from four uniform draws: side, stretch, centre x, centre y."""
    side = side_range[0] + draws[0] * (side_range[1] - side_range[0])
    stretch = MAX_ASPECT ** (2 * draws[1] - 1)
    half_w, half_h = side * math.sqrt(stretch) / 2, side / math.sqrt(stretch) / 2
    cx = half_w + draws[2] * (1 - 2 * half_w)
    cy = half_h + draws[3] * (1 - 2 * half_h)
    return (cx - half_w, cy - half_h, cx + half_w, cy + half_h)


def _apart(box: tuple[float, ...], other: tuple[float, ...]) -> bool:
    return (
        box[0] >= other[2] + _GAP or box[2] + _GAP <= other[0] or box[1] >= other[3] + _GAP or box[3] + _GAP <= other[1]
    )


_MAX_DISTRACTORS = 3
_HEADER_DRAWS = 8  # distractor count, background colour + 3 jitter, gradient angle and strength, noise seed
_OBJECT_DRAWS = 5  # shape, colour, 3 jitter
_BOX_DRAWS = 4  # side, stretch, centre x, centre y
_DRAWS = _HEADER_DRAWS + (1 + _MAX_DISTRACTORS) * _OBJECT_DRAWS + _BOX_DRAWS * (1 + _MAX_DISTRACTORS * _PLACEMENT_TRIES)


def sample_scene(rng: np.random.Generator, num_classes: int, colours: int = len(PALETTE),
                 distractors: int = _MAX_DISTRACTORS) -> Scene:
    """Draw a scene: main object, 1-3 distractors (at most ``distractors``) not touching any other object,
    colours, background. Fewer ``distractors`` keep every other draw: the scene is the default one with its
    last distractors left out.

    All randomness comes from one fixed-size block of uniforms: a scene costs one generator call, and
    how many placement tries fail never shifts the other draws."""
    draws = rng.random(_DRAWS).tolist()
    header, draws = draws[:_HEADER_DRAWS], draws[_HEADER_DRAWS:]
    split = (1 + _MAX_DISTRACTORS) * _OBJECT_DRAWS
    object_draws, box_draws = draws[:split], draws[split:]
    count_draw, background_draw, *background_jitter, angle_draw, strength_draw, noise_draw = header
    background = int(background_draw * colours)

    boxes = [_box(MAIN_SIDE, box_draws[:_BOX_DRAWS])]
    for distractor in range(min(distractors, 1 + int(count_draw * _MAX_DISTRACTORS))):
        first = _BOX_DRAWS * (1 + distractor * _PLACEMENT_TRIES)
        for attempt in range(_PLACEMENT_TRIES):
            start = first + _BOX_DRAWS * attempt
            candidate = _box(DISTRACTOR_SIDE, box_draws[start : start + _BOX_DRAWS])
            if all(_apart(candidate, other) for other in boxes):
                boxes.append(candidate)
                break
        # no free spot beside a very large main object: the scene just has one object fewer

    objects = []
    for m, box in enumerate(boxes):
        shape_draw, colour_draw, *jitter = object_draws[_OBJECT_DRAWS * m : _OBJECT_DRAWS * (m + 1)]
        colour = int(colour_draw * (colours - 1))
        colour += colour >= background  # any palette entry but the background's
        rgb = _jittered(PALETTE[colour][1], jitter)
        objects.append(SceneObject(shape=int(shape_draw * num_classes), colour=colour, rgb=rgb, box=box))
    angle, strength = 2 * math.pi * angle_draw, GRADIENT * strength_draw
    return Scene(
        objects=tuple(objects),
        background=background,
        background_rgb=_jittered(PALETTE[background][1], background_jitter),
        gradient=(strength * math.cos(angle), strength * math.sin(angle)),
        noise_seed=int(noise_draw * 2**31),
    )


def render_scene(scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterize a scene at ``size`` pixels (pixel centres sampled, no anti-aliasing).

    Returns the image (size, size, 3) uint8 and one mask per object (M, size, size) bool, in
    ``scene.objects`` order (objects never overlap, so every mask is fully visible).
    """
    centres = (np.arange(size, dtype=np.float32) + 0.5) / size
    gradient = scene.gradient[0] * (centres[None, :] - 0.5) + scene.gradient[1] * (centres[:, None] - 0.5)
    image = gradient[..., None] + np.asarray(scene.background_rgb, dtype=np.float32)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for m, obj in enumerate(scene.objects):
        x0, y0, x1, y1 = obj.box
        # only the pixels whose centres can fall inside the box
        c0, c1 = int(x0 * size), min(math.ceil(x1 * size), size)
        r0, r1 = int(y0 * size), min(math.ceil(y1 * size), size)
        local_x = (centres[None, c0:c1] - (x0 + x1) / 2) / ((x1 - x0) / 2)
        local_y = (centres[r0:r1, None] - (y0 + y1) / 2) / ((y1 - y0) / 2)
        inside = _shape_mask(SHAPES[obj.shape], local_x, local_y)
        masks[m, r0:r1, c0:c1] = inside
        image[r0:r1, c0:c1][inside] = obj.rgb
    image += np.random.default_rng(scene.noise_seed).integers(-NOISE, NOISE + 1, size=image.shape, dtype=np.int8)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def scene_caption(scene: Scene) -> str:
    """E.g. ``"a large red circle with a small blue square and a small green cross on a gray background"``."""
    main, *others = scene.objects
    text = f"a large {PALETTE[main.colour][0]} {SHAPES[main.shape]}"
    parts = [f"a small {PALETTE[o.colour][0]} {SHAPES[o.shape]}" for o in others]
    if parts:
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text += " with " + listed
    background = PALETTE[scene.background][0]
    article = "an" if background[0] in "aeiou" else "a"
    return text + f" on {article} {background} background"


# Rendered scenes kept in this process: the parameters that fix a scene's pixels (all but n: scene i of a set is
# scene i of every larger set; load_size last) -> {index: (scene, read-only pixels)}, oldest set first.
_KEPT: OrderedDict[tuple, dict[int, tuple[Scene, np.ndarray]]] = OrderedDict()
_KEPT_LOCK = threading.Lock()


def _kept_bytes(key: tuple, scenes: dict) -> int:
    """Pixel bytes of the kept scenes of one set: 3 uint8 channels of load_size x load_size each."""
    return len(scenes) * 3 * key[-1] ** 2


def _keep(key: tuple, index: int, rendered: tuple[Scene, np.ndarray]) -> None:
    """Keep one rendered scene, dropping the least recently extended sets to stay within RENDER_CACHE_BYTES."""
    with _KEPT_LOCK:  # a loader may read sources from several threads
        _KEPT.setdefault(key, {})[index] = rendered
        _KEPT.move_to_end(key)
        used = sum(_kept_bytes(k, scenes) for k, scenes in _KEPT.items())
        while used > RENDER_CACHE_BYTES and len(_KEPT) > 1:
            used -= _kept_bytes(*_KEPT.popitem(last=False))


class SyntheticScenes(Source):
    """``synthetic:scenes``: ``n`` rendered scenes classified by the shape of their main object.

    Args:
        n: number of scenes.
        size: render resolution in pixels (square).
        seed: base seed; scene ``i`` of split ``s`` comes from ``numpy.random.default_rng([seed, s, i])``.
        split: ``"train"`` or ``"test"``; the split enters the seed, so the two never share a scene.
        num_classes: how many of ``SHAPES`` are used (for the main object and the distractors).
        load_size: output side; ``None`` keeps ``size``, otherwise the render is resized (bilinear) as a
            decoded image would be.
        colours: how many of ``PALETTE``'s colours are used (the first ones). Few colours make colour
            useless for telling scenes apart, so self-supervised methods must look at shapes.
        distractors: the most small distractor objects per scene (0-3; a scene draws 1-3 and keeps at most
            this many); 0 gives one object per scene, whose caption names only the class shape.

    Samples follow :class:`wildssl.data.sample.Source`; ``aspect`` is 1.0, ``boxes`` hold every object
    (main first) with its shape as box label, ``labels`` the sorted set of shapes present; ``mask(i)``
    is the scene's class map (0 = background, ``1 + shape`` on each object).
    """

    # what ``open_source("synthetic:scenes?...")`` accepts, with the type each query value is parsed to
    QUERY_PARAMETERS = {"n": int, "size": int, "seed": int, "split": str, "num_classes": int, "colours": int,
                        "distractors": int}

    def __init__(
        self,
        n: int = 2000,
        size: int = 64,
        seed: int = 0,
        split: str = "train",
        num_classes: int = len(SHAPES),
        load_size: int | None = None,
        colours: int = len(PALETTE),
        distractors: int = _MAX_DISTRACTORS,
    ) -> None:
        where = f"synthetic:scenes (n={n}, size={size}, seed={seed}, split={split}, num_classes={num_classes})"
        if n < 1:
            raise DataError(f"{where}: n must be >= 1")
        if size < 8:
            raise DataError(f"{where}: size must be >= 8 pixels for the shapes to be drawable")
        if seed < 0:
            raise DataError(f"{where}: seed must be >= 0")
        if split not in SPLITS:
            raise DataError(f"{where}: split must be one of {', '.join(SPLITS)}")
        if not 2 <= num_classes <= len(SHAPES):
            raise DataError(f"{where}: num_classes must be in 2..{len(SHAPES)}")
        if not 2 <= colours <= len(PALETTE):
            raise DataError(f"{where}: colours must be in 2..{len(PALETTE)}")
        if not 0 <= distractors <= _MAX_DISTRACTORS:
            raise DataError(f"{where}: distractors must be in 0..{_MAX_DISTRACTORS}, got {distractors}")
        if load_size is not None and load_size < 1:
            raise DataError(f"{where}: load_size must be >= 1, got {load_size}")
        self.n, self.size, self.seed, self.split, self.num_classes = n, size, seed, split, num_classes
        self.colours, self.distractors = colours, distractors
        self.load_size = size if load_size is None else load_size
        self.classes = list(SHAPES[:num_classes])
        # Rendered pixels per index, kept when the whole set fits in RENDER_CACHE_BYTES: a scene is a pure
        # function of its index, and rendering (about 0.5 ms a 32-px scene) was a fifth of a quick recipe's step.
        # Kept per process (_KEPT), not per source: a k-NN memory of the first 1,000 training scenes, or a
        # second encoder's evaluation, reads the pixels a training run already rendered.
        self._cache = n * self.load_size * self.load_size * 3 <= RENDER_CACHE_BYTES
        self._key = (seed, split, num_classes, colours, distractors, size, self.load_size)

    def __len__(self) -> int:
        return self.n

    def captioned_count(self) -> int:
        return len(self)  # every scene is rendered with its caption

    def class_labels(self) -> list[int]:
        return [self.scene(i).objects[0].shape for i in range(self.n)]

    def scene(self, index: int) -> Scene:
        """The scene at ``index`` (a pure function of seed, split and index)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic scenes")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return sample_scene(rng, self.num_classes, self.colours, self.distractors)

    def _render(self, index: int) -> tuple[Scene, np.ndarray]:
        """The scene at ``index`` and its ``(3, load_size, load_size)`` uint8 pixels (read-only when cached)."""
        if not 0 <= index < self.n:  # before the kept scenes, which may hold a larger set's
            raise IndexError(f"index {index} out of range for {self.n} synthetic scenes")
        kept = _KEPT.get(self._key, {}) if self._cache else {}
        if index in kept:
            return kept[index]
        scene = self.scene(index)
        pixels, _ = render_scene(scene, self.size)
        if self.load_size != self.size:
            pixels = np.asarray(Image.fromarray(pixels).resize((self.load_size,) * 2, Image.BILINEAR))
        pixels = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        if self._cache:
            pixels.flags.writeable = False
            _keep(self._key, index, (scene, pixels))
        return scene, pixels

    def __getitem__(self, index: int) -> dict:
        scene, pixels = self._render(index)
        image = torch.tensor(pixels)  # a copy: a caller may change its sample in place
        shapes = [obj.shape for obj in scene.objects]
        return make_sample(
            image,
            aspect=1.0,
            index=index,
            label=shapes[0],
            labels=sorted(set(shapes)),
            captions=[scene_caption(scene)],
            boxes=[obj.box for obj in scene.objects],
            box_labels=shapes,
        )

    def mask(self, index: int) -> torch.Tensor:
        """Class map ``(size, size)`` long at the render resolution: 0 for the background, ``1 + shape``
        for the pixels of each object (the main object and the distractors)."""
        scene = self.scene(index)
        _, masks = render_scene(scene, self.size)
        classes = np.zeros((self.size, self.size), dtype=np.int64)
        for obj, pixels in zip(scene.objects, masks):
            classes[pixels] = obj.shape + 1
        return torch.from_numpy(classes)

    def describe(self) -> str:
        return (
            f"synthetic:scenes: {self.n} {self.split} scenes at {self.size}px (loaded at {self.load_size}px), "
            f"seed {self.seed}, {self.num_classes} classes ({', '.join(self.classes)})"
        )
