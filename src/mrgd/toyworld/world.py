"""The shapes world: seeded scenes of coloured shapes on textured backgrounds, with ground truth.

Everything the embedded model learns comes from here: whole scenes with captions, object crops with
their phrase, bare backgrounds with their name. Each sample keeps its boxes, masks and the role of
every caption word, so the benchmarks can judge keyword selection and the oracle can judge colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 35),
    "blue": (35, 70, 215),
    "purple": (135, 45, 185),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
BACKGROUNDS = ("sky", "grass", "sea", "sand")
# How a caption places the objects on each background ("a red circle on grass").
BACKGROUND_PHRASES = {"sky": "in the sky", "grass": "on grass", "sea": "on the sea", "sand": "on sand"}
# Object-agnostic words: they never depend on the picture, so a good keyword selector must skip them.
QUALITY_WORDS = (
    "masterpiece", "best quality", "highly detailed", "8k", "sharp focus", "beautiful",
    "high resolution", "ultra detailed", "professional", "award winning", "intricate", "cinematic lighting",
)
# Filler words that no training caption ever holds, so benchmarks can ask whether "names nothing" generalises beyond
# the words the model was taught: the keyword benchmark's held-out fillers (benchmarks/keywords.py --filler held-out)
# and the held-out test suite's (benchmarks/make_test_suite.py). Training's random-vocabulary padding skips them.
HELD_OUT_FILLERS = ("vivid colors", "4k", "trending on artstation", "octane render", "photorealistic", "dramatic",
                    "hdr", "soft light", "epic composition", "studio quality", "crisp", "stunning")
TEST_FILLERS = ("unreal engine", "bokeh", "volumetric fog", "golden hour", "ray tracing", "depth of field",
                "film grain", "concept art", "matte painting", "wallpaper", "symmetrical", "digital painting",
                "elegant", "pastel tones", "ambient occlusion", "highres")


@dataclass
class ShapeObject:
    color: str
    shape: str
    box: tuple[float, float, float, float]  # x, y, w, h as fractions of the canvas
    mask: np.ndarray  # visible pixels (bool, H x W), after later objects occlude it

    @property
    def phrase(self) -> str:
        return f"a {self.color} {self.shape}"


@dataclass
class Scene:
    image: np.ndarray  # uint8 H x W x 3
    background: str
    objects: list[ShapeObject] = field(default_factory=list)


@dataclass
class Caption:
    text: str
    roles: list[tuple[str, str]]  # (word, role) with role in object / color / background / quality / filler


# ---------------------------------------------------------------- backgrounds (low frequency only:
# a 4-channel latent at f = 8 cannot carry per-pixel noise, so textures are broad shapes)

def _blurred_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    grid = rng.random((cells, cells)).astype(np.float32)
    img = Image.fromarray((grid * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def render_background(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size RGB float image in [0, 1] of one of BACKGROUNDS."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if name == "sky":
        top, bottom = np.array([0.35, 0.6, 0.95]), np.array([0.75, 0.88, 1.0])
        img = top * (1 - yy[..., None]) + bottom * yy[..., None]
        clouds = np.clip(_blurred_noise(rng, size, 4) * 1.8 - 0.9, 0, 1)
        img = img * (1 - clouds[..., None]) + clouds[..., None] * np.array([0.97, 0.97, 0.99])
    elif name == "grass":
        base = np.array([0.25, 0.62, 0.2])
        phase = rng.uniform(0, 2 * math.pi)
        blades = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * rng.uniform(5, 8) + 0.6 * yy) + phase)
        shade = _blurred_noise(rng, size, 3)
        img = base * (0.8 + 0.25 * blades[..., None]) * (0.85 + 0.3 * shade[..., None])
    elif name == "sea":
        base = np.array([0.1, 0.45, 0.6])
        phase = rng.uniform(0, 2 * math.pi)
        waves = 0.5 + 0.5 * np.sin(2 * math.pi * (yy * rng.uniform(4, 6) + 0.15 * np.sin(6 * xx)) + phase)
        img = base * (0.8 + 0.35 * waves[..., None]) + 0.1 * waves[..., None] ** 4
    elif name == "sand":
        base = np.array([0.87, 0.76, 0.52])
        phase = rng.uniform(0, 2 * math.pi)
        dunes = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * 1.5 + yy * rng.uniform(2, 3.5)) + phase)
        img = base * (0.88 + 0.16 * dunes[..., None])
    else:
        raise ValueError(f"unknown background {name!r}")
    return np.clip(img, 0, 1).astype(np.float32)


# ---------------------------------------------------------------- shapes

def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.85, y * 0.85) for x, y in pts]
    elif shape == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        pts = [(x, y + 0.2) for x, y in pts]
    elif shape == "star":
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rad = 1.0 if i % 2 == 0 else 0.45
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.08))
    else:
        return None  # circle
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float, grow: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (float, size x size) of one shape, drawn at 4x and reduced."""
    s = 4
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    rr = (r + grow) * s
    poly = _shape_polygon(shape, cx * s, cy * s, rr, angle)
    if poly is None:
        draw.ellipse([cx * s - rr, cy * s - rr, cx * s + rr, cy * s + rr], fill=255)
    else:
        draw.polygon(poly, fill=255)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, np.float32) / 255.0


def _paint(img: np.ndarray, color: str, shape: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Paint an outlined shape; returns its coverage mask."""
    size = img.shape[0]
    outline = shape_mask(shape, size, cx, cy, r, angle)
    inner = shape_mask(shape, size, cx, cy, r, angle, grow=-max(2.0, 0.09 * r))
    rgb = np.array(COLORS[color], np.float32) / 255.0
    dark = rgb * 0.45
    img[:] = img * (1 - outline[..., None]) + dark * outline[..., None]
    img[:] = img * (1 - inner[..., None]) + rgb * inner[..., None]
    return outline


# ---------------------------------------------------------------- scenes

def make_scene(
    rng: np.random.Generator,
    size: int = 128,
    n_objects: int | None = None,
    background: str | None = None,
    min_scale: float = 0.28,
    max_scale: float = 0.55,
) -> Scene:
    """A random scene: a textured background and 1-3 outlined shapes (overlaps allowed)."""
    background = background or str(rng.choice(BACKGROUNDS))
    img = render_background(background, size, rng)
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    objects: list[ShapeObject] = []
    coverages = []
    for _ in range(n):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        side = rng.uniform(min_scale, max_scale) * size
        r = side / 2
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        angle = math.radians(rng.uniform(-15, 15))
        cov = _paint(img, color, shape, cx, cy, r, angle)
        ys, xs = np.nonzero(cov > 0.5)
        if len(xs) == 0:
            continue
        box = (xs.min() / size, ys.min() / size, (xs.max() + 1 - xs.min()) / size, (ys.max() + 1 - ys.min()) / size)
        coverages.append(cov)
        objects.append(ShapeObject(color, shape, box, cov > 0.5))
    for i, obj in enumerate(objects):  # later objects occlude earlier ones
        for later in coverages[i + 1:]:
            obj.mask = obj.mask & (later <= 0.5)
    return Scene((img * 255).round().astype(np.uint8), background, objects)


def make_object_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, ShapeObject, str]:
    """A region-level sample: one shape filling most of a size x size crop, as a region box holds it."""
    background = str(rng.choice(BACKGROUNDS))
    scene = make_scene(rng, size, n_objects=1, background=background, min_scale=0.62, max_scale=0.9)
    return scene.image, scene.objects[0], background


def make_background_crop(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A region-level sample: a bare background."""
    background = str(rng.choice(BACKGROUNDS))
    img = render_background(background, size, rng)
    return (img * 255).round().astype(np.uint8), background


# ---------------------------------------------------------------- captions

def _join(phrases: list[str]) -> str:
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def quality_padding(rng: np.random.Generator, max_words: int = 5) -> list[str]:
    k = int(rng.integers(1, max_words + 1))
    return [str(w) for w in rng.choice(QUALITY_WORDS, size=k, replace=False)]


def pad_with_quality(text: str, rng: np.random.Generator, p: float = 0.5) -> str:
    """With probability p, surround a phrase with quality words before, after or both."""
    if rng.random() >= p:
        return text
    where = rng.integers(0, 3)
    before = quality_padding(rng) if where in (0, 2) else []
    after = quality_padding(rng) if where in (1, 2) else []
    return ", ".join(before + [text] + after)


def caption_scene(scene: Scene, rng: np.random.Generator, p_background: float = 0.8, p_quality: float = 0.5) -> str:
    """'a red circle and a blue star on grass', sometimes without the background, sometimes padded."""
    text = _join([o.phrase for o in scene.objects])
    if rng.random() < p_background:
        text = f"{text} {BACKGROUND_PHRASES[scene.background]}"
    return pad_with_quality(text, rng, p_quality)


def caption_layout(scene: Scene, rng: np.random.Generator, p_background: float = 0.8, p_quality: float = 0.3) -> str:
    """'grass, masterpiece, a red circle, a blue star, 8k': the scene written as r_total writes a layout (method.md
    §1): the background first, then each object's phrase, comma-joined, each part padded with quality words on its own.
    """
    parts = [o.phrase for o in scene.objects]
    if rng.random() < p_background:
        parts.insert(0, scene.background)
    return ", ".join(pad_with_quality(part, rng, p_quality) for part in parts)


def word_roles(text: str) -> list[tuple[str, str]]:
    """Each word of a caption with its role: object, color, background, quality or filler."""
    quality = {w for q in QUALITY_WORDS for w in q.split()}
    roles = []
    for word in text.replace(",", " ").split():
        if word in SHAPES:
            role = "object"
        elif word in COLORS:
            role = "color"
        elif word in BACKGROUNDS:
            role = "background"
        elif word in quality:
            role = "quality"
        else:
            role = "filler"
        roles.append((word, role))
    return roles


def vocabulary_text() -> list[str]:
    """Every word the world can say, for building the tokenizer."""
    words = ["a", "and", "on", "in", "the", ","] + list(COLORS) + list(SHAPES) + list(BACKGROUNDS)
    words += [w for q in QUALITY_WORDS for w in q.split()]
    words += [p for phrase in BACKGROUND_PHRASES.values() for p in phrase.split()]
    return sorted(set(words))
