"""Pools of shapes-world samples, generated once per training run and reused by every stage.

Rendering a scene costs a few milliseconds; a training step wants dozens. So a stage draws from pools
made up front (scenes with label maps, object crops, backgrounds), and only captions are drawn anew each
time: quality padding must stay independent of the picture across the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import BACKGROUND_PHRASES, BACKGROUNDS, COLORS, SHAPES, caption_layout, caption_scene, make_background_crop, make_object_crop, make_scene, pad_with_quality


@dataclass
class ScenePool:
    images: np.ndarray  # N x H x W x 3 uint8
    labels: np.ndarray  # N x H x W uint8: 0 background, i + 1 object i (visible part)
    backgrounds: np.ndarray  # N, index into BACKGROUNDS
    objects: np.ndarray  # N x 3 x 2 (color index, shape index), -1 where absent

    def caption(self, i: int, rng: np.random.Generator, p_layout: float = 0.0) -> str:
        """A sentence caption, or with probability `p_layout` the comma-joined parts a layout's r_total has."""
        from .world import Scene, ShapeObject

        objs = [ShapeObject(list(COLORS)[c], SHAPES[s], (0, 0, 0, 0), None) for c, s in self.objects[i] if c >= 0]
        scene = Scene(None, BACKGROUNDS[self.backgrounds[i]], objs)
        if p_layout and rng.random() < p_layout:
            return caption_layout(scene, rng)
        return caption_scene(scene, rng)


@dataclass
class CropPool:
    images: np.ndarray  # N x S x S x 3 uint8
    labels: np.ndarray  # N x 2 (color index, shape index); (-1, -1) for a bare background
    backgrounds: np.ndarray  # N

    def caption(self, i: int, rng: np.random.Generator) -> str:
        c, s = self.labels[i]
        text = f"a {list(COLORS)[c]} {SHAPES[s]}" if c >= 0 else BACKGROUNDS[self.backgrounds[i]]
        return pad_with_quality(text, rng, p=0.3)


def make_scene_pool(n: int, seed: int, size: int = 128) -> ScenePool:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = np.zeros((n, size, size), np.uint8)
    backgrounds = np.zeros(n, np.int64)
    objects = -np.ones((n, 3, 2), np.int64)
    for i in range(n):
        scene = make_scene(rng, size)
        images[i] = scene.image
        backgrounds[i] = BACKGROUNDS.index(scene.background)
        for j, obj in enumerate(scene.objects):
            labels[i][obj.mask] = j + 1
            objects[i, j] = (list(COLORS).index(obj.color), SHAPES.index(obj.shape))
    return ScenePool(images, labels, backgrounds, objects)


def make_crop_pool(n: int, seed: int, size: int = 96, p_background: float = 0.2) -> CropPool:
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    labels = -np.ones((n, 2), np.int64)
    backgrounds = np.zeros(n, np.int64)
    for i in range(n):
        if rng.random() < p_background:
            images[i], bg = make_background_crop(rng, size)
        else:
            images[i], obj, bg = make_object_crop(rng, size)
            labels[i] = (list(COLORS).index(obj.color), SHAPES.index(obj.shape))
        backgrounds[i] = BACKGROUNDS.index(bg)
    return CropPool(images, labels, backgrounds)


def save_pool(pool, path: Path) -> None:
    np.savez(path, **pool.__dict__)


def load_pool(cls, path: Path):
    with np.load(path) as f:
        return cls(**{k: f[k] for k in f.files})


def to_tensor(images: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x size x size in [-1, 1]."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


__all__ = ["ScenePool", "CropPool", "make_scene_pool", "make_crop_pool", "save_pool", "load_pool", "to_tensor", "BACKGROUND_PHRASES"]
