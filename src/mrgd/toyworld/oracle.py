"""Read a shapes-world picture back from its pixels: the colour inside a box and the background around it.

The quality benchmark and the embedded-model tests judge generated pictures with this oracle (and the shape with
the CLIP scorer), so a claim like "the circle came out red" is measured, not assumed.
"""

from __future__ import annotations

import numpy as np

from .world import BACKGROUNDS, COLORS, render_background

# Mean colour of each background, from the generator itself.
BACKGROUND_MEANS = {name: render_background(name, 64, np.random.default_rng(0)).reshape(-1, 3).mean(0) * 255
                    for name in BACKGROUNDS}


def read_colour(pixels: np.ndarray, max_distance: float = 60.0, min_share: float = 0.05) -> str | None:
    """The world colour that most of the pixels (N x 3) lie close to; None when too few are close to any."""
    palette = np.array(list(COLORS.values()), float)
    distance = np.linalg.norm(pixels[:, None, :].astype(float) - palette[None], axis=-1)
    nearest, close = distance.argmin(1), distance.min(1) < max_distance
    if close.sum() < min_share * len(pixels):
        return None
    return list(COLORS)[int(np.bincount(nearest[close], minlength=len(palette)).argmax())]


def read_background(image: np.ndarray, exclude: list[tuple[int, int, int, int]] = ()) -> str:
    """The background whose mean colour is closest to the mean of the pixels outside the given (x0, y0, x1, y1) boxes."""
    mask = np.ones(image.shape[:2], bool)
    for x0, y0, x1, y1 in exclude:
        mask[y0:y1, x0:x1] = False
    mean = image[mask].reshape(-1, 3).mean(0)
    return min(BACKGROUND_MEANS, key=lambda name: np.linalg.norm(BACKGROUND_MEANS[name] - mean))


def box_pixels(box: tuple[float, float, float, float], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A fractional [x, y, w, h] box as integer pixel bounds (x0, y0, x1, y1) on a (W, H) canvas."""
    x, y, w, h = box
    return int(x * size[0]), int(y * size[1]), min(size[0], int((x + w) * size[0])), min(size[1], int((y + h) * size[1]))
