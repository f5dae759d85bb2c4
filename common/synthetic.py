"""The built-in synthetic detection dataset (rendered deterministically from a seed) and its export
to the real formats (COCO JSON, VOC XML, ImageFolder), so every loader and script can be tried
without downloading anything."""
from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .data import _target_tensors, write_json_atomic

# --------------------------------------------------------------------------------------------
# Built-in synthetic dataset
# --------------------------------------------------------------------------------------------
# Sorted by name, so a VOC export read back without a class list gets the same label order.
SHAPES = ("circle", "crescent", "cross", "hexagon", "ring", "square", "star", "triangle")
_MODES = ("scenes", "object", "unlabeled")


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(t), np.sin(t)], 1)


def _shape_parts(name: str) -> list[tuple[np.ndarray, int]]:
    """A shape as polygons in [-1, 1]^2, each drawn with fill 1 (add) or 0 (cut out)."""
    if name == "circle":
        return [(_regular_polygon(48), 1)]
    if name == "ring":
        return [(_regular_polygon(48), 1), (_regular_polygon(48, 0.55), 0)]
    if name == "crescent":
        return [(_regular_polygon(48), 1), (_regular_polygon(48, 0.85) + [0.45, -0.15], 0)]
    if name == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), 1)]
    if name == "triangle":
        return [(np.array([[0, -1], [1, 1], [-1, 1]], float), 1)]
    if name == "hexagon":
        return [(_regular_polygon(6, phase=0.0), 1)]
    if name == "star":
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return [(_regular_polygon(10) * r[:, None], 1)]
    if name == "cross":
        a = 0.34
        pts = [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a],
               [-1, a], [-1, -a], [-a, -a]]
        return [(np.array(pts, float), 1)]
    raise KeyError(name)


_PARTS = {name: _shape_parts(name) for name in SHAPES}


def _draw_mask(parts, cx, cy, w, h, angle, size) -> np.ndarray:
    """Rasterise a shape scaled to (w, h), rotated by `angle`, centred at (cx, cy)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    c, s = math.cos(angle), math.sin(angle)
    for poly, fill in parts:
        x, y = poly[:, 0] * w / 2, poly[:, 1] * h / 2
        xs, ys = cx + c * x - s * y, cy + s * x + c * y
        draw.polygon(list(zip(xs.tolist(), ys.tolist())), fill=fill)
    return np.asarray(canvas, dtype=bool)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A (h, w, 3) float texture: solid, stripes, checks or blotches in two colours."""
    c1, c2 = rng.uniform(0.05, 1.0, 3), rng.uniform(0.05, 1.0, 3)
    kind = rng.integers(4)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        a, period = rng.uniform(0, math.pi), rng.uniform(3, 9)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == 2:
        p = int(rng.integers(3, 9))
        t = (((xx // p) + (yy // p)) % 2).astype(np.float32)
    else:
        small = rng.random((h // 8 + 1, w // 8 + 1)).astype(np.float32)
        t = np.kron(small, np.ones((8, 8), np.float32))[:h, :w] > 0.5
    t = np.asarray(t, np.float32)[..., None]
    return c1 * (1 - t) + c2 * t


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Clutter: a colour gradient, irregular low-contrast blobs, strokes and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    a, b = rng.uniform(0.2, 0.8, 3), rng.uniform(0.2, 0.8, 3)
    img = a * (1 - xx[..., None]) + b * yy[..., None] * 0.5 + 0.25 * (1 - yy[..., None]) * b
    img = np.clip(img, 0, 1)
    blobs = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(blobs)
    n_blobs = int(rng.integers(3, 9))
    for k in range(n_blobs):  # irregular polygons: clutter, never one of the classes
        n = int(rng.integers(5, 10))
        t = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.3, 1.0, n) * rng.uniform(4, size / 4)
        cx, cy = rng.uniform(0, size, 2)
        draw.polygon(list(zip((cx + r * np.cos(t)).tolist(), (cy + r * np.sin(t)).tolist())), fill=k + 1)
    ids = np.asarray(blobs)
    colours = np.concatenate([np.zeros((1, 3)), rng.uniform(0, 1, (n_blobs, 3))])
    img = np.where(ids[..., None] > 0, 0.6 * img + 0.4 * colours[ids], img)
    strokes = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(strokes)
    for _ in range(rng.integers(2, 7)):
        d.line(rng.uniform(0, size, 4).tolist(), fill=1, width=int(rng.integers(1, 3)))
    s = np.asarray(strokes, bool)
    img[s] = 0.5 * img[s] + 0.5 * rng.uniform(0, 1, 3)
    img += rng.normal(0, 0.04, img.shape)
    return img


# --- the "easy" rendering (the default): learnable at CPU budgets, with headroom ---------------
CONTRAST_FLOOR = 0.3   # every object differs from what lies behind it by >= this (max over RGB of mean colours)
_EASY_PICK = 0.45      # colours are drawn until they clear this margin against the background and the objects below
_EASY_TEXTURE = 0.08   # texture amplitude (+-): patterns shade the object, never cut its silhouette


def _smooth_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A mid-range colour, a gentle gradient and low-frequency waves: clutter without edges, so
    nothing in the background can be mistaken for a shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.25, 0.75, 3)
    a = rng.uniform(0, 2 * math.pi)
    img = base + rng.uniform(-0.12, 0.12, 3) * ((xx * math.cos(a) + yy * math.sin(a)) - 0.5)[..., None]
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * math.pi)
        img = img + rng.uniform(-0.03, 0.03, 3) * np.sin(2 * math.pi * (fx * xx + fy * yy) + ph)[..., None]
    return img


def _shading(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 1) in [-1, 1]: solid, stripes, checks or a linear shade."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        t = np.zeros((h, w), np.float32)
    elif kind == 1:
        a, period = rng.uniform(0, math.pi), rng.uniform(3, 7)
        t = np.sign(np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period))
    elif kind == 2:
        p = int(rng.integers(3, 6))
        t = (((xx // p) + (yy // p)) % 2) * 2.0 - 1
    else:
        a = rng.uniform(0, 2 * math.pi)
        g = xx * math.cos(a) + yy * math.sin(a)
        t = 2 * (g - g.min()) / max(1e-6, float(g.max() - g.min())) - 1
    return np.asarray(t, np.float32)[..., None]


def _contrasting_colour(rng: np.random.Generator, behind: list[np.ndarray]) -> np.ndarray:
    """A colour whose largest RGB difference from each colour in `behind` is at least _EASY_PICK
    (the best of 32 draws when none clears it)."""
    best, best_score = None, -1.0
    for _ in range(32):
        c = rng.uniform(0.05, 0.95, 3)
        score = min(float(np.abs(c - b).max()) for b in behind)
        if score > best_score:
            best, best_score = c, score
        if score >= _EASY_PICK:
            break
    return best


# Geometry of each rendering: relative object side (log-uniform), box aspect w/h (log-uniform),
# share of object-centric images with one object, rotation, and how visible an occluded object stays.
_GEOMETRY = {
    "hard": {"scene_side": (0.1, 0.5), "object_side": (0.3, 0.75), "object_multi_side": (0.25, 0.45),
             "aspect": (0.6, 1.7), "object_aspect": (0.6, 1.7), "p_single": 0.7, "multi": (2, 4),
             "min_pixels": 12, "visible": 0.5, "centred": False},
    "easy": {"scene_side": (0.2, 0.55), "object_side": (0.55, 0.85), "object_multi_side": (0.35, 0.5),
             "aspect": (1 / 3, 3.0), "object_aspect": (0.5, 2.0), "p_single": 0.75, "multi": (2, 3),
             "min_pixels": 0, "visible": 0.6, "centred": True},
}
DIFFICULTIES = tuple(_GEOMETRY)


class SyntheticDetection(Dataset):
    """Coloured shapes of 8 classes told apart by shape, several per scene, with boxes, masks and
    `difficult` flags; every image is a pure function of `(seed, index)`.

    `difficulty="easy"` (the default, the benchmark of `benchmarks/bench_learnability.py`): objects
    differ from what lies behind them by at least CONTRAST_FLOOR, textures shade an object without
    cutting its silhouette, the background is smooth (nothing in it resembles a shape), scene
    objects span 20-55% of the image side with box aspect ratios 1/3-3, object-centric images hold
    one dominant, centred object of 55-85% of the side (or 2-3 of one class). `difficulty="hard"`:
    the original rendering (blotch / check textures, polygon clutter and strokes, no contrast floor,
    objects from 10% of the side, aspect 0.6-1.7), bit-identical to earlier versions.

    Modes:
    - "scenes": `min_objects..max_objects` objects, larger ones first, a later object may cover
      part of an earlier one (which stays at least 60% visible; 50% when hard). Targets: boxes
      (tight on the visible pixels), labels, masks (visible pixels), difficult (visible fraction
      < 0.6 or short side < 6 px).
    - "object": one dominant class per image; the target holds only `image_label` (0..C-1); the
      true boxes are kept aside in `annotations(i)`.
    - "unlabeled": scenes whose target holds only `image_id`; the truth is in `annotations(i)`.
    `long_tail=r` draws classes with geometrically falling frequency, most / least frequent = r.
    `cache=DIR` renders the whole set once into memory-mapped arrays under DIR (see `RenderCache`),
    shared by DataLoader workers; every later read costs a copy, not a render.
    """

    classes = SHAPES

    def __init__(self, num_images: int, image_size: int = 128, mode: str = "scenes", seed: int = 0,
                 min_objects: int = 2, max_objects: int = 6, long_tail: float | None = None,
                 transforms=None, difficulty: str = "easy", cache=None):
        if mode not in _MODES:
            raise ValueError(f"unknown synthetic mode {mode!r}; choose one of {_MODES}")
        if difficulty not in _GEOMETRY:
            raise ValueError(f"unknown synthetic difficulty {difficulty!r}; choose one of {DIFFICULTIES}")
        if num_images < 1 or image_size < 32:
            raise ValueError("synthetic dataset needs num_images >= 1 and image_size >= 32")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        self.num_images, self.size, self.mode, self.seed = num_images, image_size, mode, seed
        self.min_objects, self.max_objects, self.long_tail = min_objects, max_objects, long_tail
        self.difficulty, self.geometry = difficulty, _GEOMETRY[difficulty]
        self.transforms = transforms
        c = len(SHAPES)
        p = np.ones(c) if not long_tail else float(long_tail) ** (-np.arange(c) / (c - 1))
        self.class_probs = p / p.sum()
        self.image_ids = list(range(1, num_images + 1))
        self.num_dropped_boxes = 0
        self.cache = None if cache is None else RenderCache.build(self, cache)

    def __len__(self) -> int:
        return self.num_images

    def image_size(self, i: int) -> tuple[int, int]:
        return self.size, self.size

    def cache_key(self) -> dict:
        """Everything an image depends on (the render cache's key)."""
        return {"version": RenderCache.VERSION, "seed": self.seed, "mode": self.mode, "size": self.size,
                "num_images": self.num_images, "objects": [self.min_objects, self.max_objects],
                "long_tail": self.long_tail, "difficulty": self.difficulty}

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        key = [self.seed, _MODES.index(self.mode), i, stream]
        if self.difficulty != "hard":  # "hard" keeps the original streams (bit-identical images)
            key.append(DIFFICULTIES.index(self.difficulty))
        return np.random.default_rng(key)

    def _layout(self, i: int):
        """Classes, visible masks and full masks (S, S) of image `i`; geometry only, no colours."""
        rng, size, g = self._rng(i, 0), self.size, self.geometry
        if self.mode == "object":
            cls = int(rng.choice(len(SHAPES), p=self.class_probs))
            n = 1 if rng.random() < g["p_single"] else int(rng.integers(*g["multi"]))
            classes = [cls] * n
            rel, aspect = (g["object_side"] if n == 1 else g["object_multi_side"]), g["object_aspect"]
        else:
            n = int(rng.integers(self.min_objects, self.max_objects + 1))
            classes = rng.choice(len(SHAPES), size=n, p=self.class_probs).tolist()
            rel, aspect = g["scene_side"], g["aspect"]
        sides = np.sort(size * np.exp(rng.uniform(math.log(rel[0]), math.log(rel[1]), n)))[::-1]
        full, visible, kept = [], [], []
        for c, side in zip(classes, sides):  # largest first: smaller objects lie on top
            for _ in range(20):
                ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
                w, h = side * math.sqrt(ar), side / math.sqrt(ar)
                w, h = min(w, size * 0.95), min(h, size * 0.95)
                if g["centred"] and self.mode == "object" and n == 1:  # the labelled object dominates
                    cx = rng.uniform(max(w / 2, 0.35 * size), min(size - w / 2, 0.65 * size))
                    cy = rng.uniform(max(h / 2, 0.35 * size), min(size - h / 2, 0.65 * size))
                else:
                    cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
                m = _draw_mask(_PARTS[SHAPES[c]], cx, cy, w, h, rng.uniform(-0.3, 0.3), size)
                if m.sum() < max(12, g["min_pixels"]):
                    continue
                # keep every earlier object visible enough
                if all((v & ~m).sum() >= g["visible"] * f.sum() for v, f in zip(visible, full)):
                    visible = [v & ~m for v in visible]
                    full.append(m)
                    visible.append(m.copy())
                    kept.append(c)
                    break
        return kept, visible, full

    def annotations(self, i: int, masks: bool = False) -> dict:
        """Ground truth of image `i` (any mode) without rendering colours."""
        if self.cache is not None:
            return self.cache.annotations(i, masks)
        return self._annotations(*self._layout(i), masks=masks)

    def _annotations(self, classes, visible, full, masks: bool) -> dict:
        boxes, difficult = [], []
        for v, f in zip(visible, full):
            ys, xs = np.nonzero(v)
            x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
            boxes.append([x1, y1, x2, y2])
            difficult.append(v.sum() < 0.6 * f.sum() or min(x2 - x1, y2 - y1) < 6)
        out = {"boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
               "labels": np.asarray(classes, np.int64) + 1,
               "difficult": np.asarray(difficult, bool)}
        if masks:
            out["masks"] = np.stack(visible) if visible else np.zeros((0, self.size, self.size), bool)
        return out

    def render(self, i: int, masks: bool = True) -> tuple[np.ndarray, dict]:
        """(uint8 image (S, S, 3), annotations, with masks when `masks`)."""
        if self.cache is not None:
            return self.cache.image(i), self.cache.annotations(i, masks=masks)
        layout = self._layout(i)
        return self._paint(i, layout), self._annotations(*layout, masks=masks)

    def _paint(self, i: int, layout) -> np.ndarray:
        return self._paint_hard(i, layout[1]) if self.difficulty == "hard" else self._paint_easy(i, *layout)

    def _paint_hard(self, i: int, visible) -> np.ndarray:
        rng = self._rng(i, 1)
        img = _background(rng, self.size)
        for v in visible:
            ys, xs = np.nonzero(v)
            y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
            tex = _texture(rng, y2 - y1, x2 - x1) * rng.uniform(0.75, 1.1)
            crop = v[y1:y2, x1:x2]
            img[y1:y2, x1:x2][crop] = tex[crop]
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        return (img * 255).round().astype(np.uint8)

    def _paint_easy(self, i: int, classes, visible, full) -> np.ndarray:
        """Objects painted in order (larger first); each one's colour clears the contrast margin
        against the background around it and against every earlier object it covers or touches."""
        rng = self._rng(i, 1)
        bg = _smooth_background(rng, self.size)
        img, colours = bg.copy(), []
        for k, f in enumerate(full):
            ring = _dilate(f, 2)
            behind = [bg[ring].mean(0)] + [colours[j] for j in range(k) if (full[j] & ring).any()]
            colour = _contrasting_colour(rng, behind)
            colours.append(colour)
            ys, xs = np.nonzero(f)
            y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
            tex = colour + _EASY_TEXTURE * _shading(rng, y2 - y1, x2 - x1)
            crop = f[y1:y2, x1:x2]
            img[y1:y2, x1:x2][crop] = tex[crop]
        # later objects were painted over earlier ones: the canvas now shows only visible pixels
        img = np.clip(img + rng.normal(0, 0.015, img.shape), 0, 1)
        return (img * 255).round().astype(np.uint8)

    def __getitem__(self, i: int):
        array, ann = self.render(i, masks=self.mode == "scenes")
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        target = {"image_id": self.image_ids[i]}
        if self.mode == "scenes":
            target.update(_target_tensors(ann, (self.size, self.size)))
            target["masks"] = tv_tensors.Mask(torch.from_numpy(ann["masks"]).to(torch.uint8))
        elif self.mode == "object":
            target["image_label"] = int(ann["labels"][0]) - 1
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def classification(self, transform=None) -> "ClassificationView":
        """(image, image_label) pairs: the ImageNet-like classification view of an object-mode set."""
        if self.mode != "object":
            raise ValueError("classification() needs mode='object' (one dominant class per image)")
        return ClassificationView(self, transform)


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """The pixels within `r` (Chebyshev) of `mask` but outside it."""
    grown = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            grown |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return grown & ~mask


class ClassificationView(Dataset):
    def __init__(self, dataset: SyntheticDetection, transform=None):
        self.dataset, self.transform, self.classes = dataset, transform, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        array, ann = self.dataset.render(i, masks=False)
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            image = self.transform(image)
        return image, int(ann["labels"][0]) - 1


# --------------------------------------------------------------------------------------------
# Render cache: a synthetic set rendered once into memory-mapped arrays
# --------------------------------------------------------------------------------------------
class RenderCache:
    """A whole `SyntheticDetection` rendered once into `root/<key hash>/`: images (N, S, S, 3)
    uint8, an instance map (N, S, S) uint8 (object k of an image is value k + 1: visible masks never
    overlap), flat boxes / labels / difficult with per-image offsets, and `key.json`. The folder is
    written under a temporary name and renamed, so a reader never sees half a cache; readers open
    the arrays as read-only memory maps, lazily, so a pickled dataset (a DataLoader worker) carries
    only the path and every worker shares the page cache."""

    VERSION = 1
    FILES = ("images", "instances", "boxes", "labels", "difficult", "offsets")

    def __init__(self, path: Path):
        self.path = Path(path)
        self._arrays = None

    @classmethod
    def build(cls, dataset: "SyntheticDetection", root) -> "RenderCache":
        import hashlib

        key = dataset.cache_key()
        name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        final = Path(root) / f"{dataset.mode}-{dataset.size}px-{dataset.num_images}-{name}"
        if not (final / "key.json").is_file():
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            cls._write(dataset, tmp, key)
            try:
                os.replace(tmp, final)
            except OSError:  # the folder exists: another process finished first, keep its copy
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "key.json").is_file():
                raise FileExistsError(f"{final} exists but is not a complete render cache (no key.json); "
                                      f"delete that folder and run again")
        return cls(final)

    @classmethod
    def _write(cls, dataset, tmp: Path, key: dict) -> None:
        n, s = dataset.num_images, dataset.size
        tmp.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", "w+", np.uint8, (n, s, s, 3))
        instances = np.lib.format.open_memmap(tmp / "instances.npy", "w+", np.uint8, (n, s, s))
        boxes, labels, difficult, offsets = [], [], [], [0]
        for i in range(n):
            layout = dataset._layout(i)
            images[i] = dataset._paint(i, layout)
            ann = dataset._annotations(*layout, masks=True)
            for k, m in enumerate(ann["masks"]):
                instances[i][m] = k + 1
            boxes.append(ann["boxes"]), labels.append(ann["labels"]), difficult.append(ann["difficult"])
            offsets.append(offsets[-1] + len(ann["labels"]))
        images.flush(), instances.flush()
        del images, instances
        np.save(tmp / "boxes.npy", np.concatenate(boxes).astype(np.float32).reshape(-1, 4))
        np.save(tmp / "labels.npy", np.concatenate(labels).astype(np.int64))
        np.save(tmp / "difficult.npy", np.concatenate(difficult).astype(bool))
        np.save(tmp / "offsets.npy", np.asarray(offsets, np.int64))
        (tmp / "key.json").write_text(json.dumps(key, sort_keys=True))  # written last: marks the cache complete

    def _open(self) -> dict:
        if self._arrays is None:
            self._arrays = {f: np.load(self.path / f"{f}.npy", mmap_mode="r") for f in self.FILES}
        return self._arrays

    def __getstate__(self):
        return {"path": self.path, "_arrays": None}  # a worker reopens the memory maps itself

    def image(self, i: int) -> np.ndarray:
        return np.array(self._open()["images"][i])

    def annotations(self, i: int, masks: bool = False) -> dict:
        a = self._open()
        s, e = int(a["offsets"][i]), int(a["offsets"][i + 1])
        out = {"boxes": np.array(a["boxes"][s:e]), "labels": np.array(a["labels"][s:e]),
               "difficult": np.array(a["difficult"][s:e])}
        if masks:
            out["masks"] = np.asarray(a["instances"][i])[None] == np.arange(1, e - s + 1, dtype=np.uint8)[:, None, None]
        return out


# --------------------------------------------------------------------------------------------
# Export to the real formats
# --------------------------------------------------------------------------------------------
def export_coco(dataset: SyntheticDetection, out_dir, split: str = "train") -> Path:
    """Write `out_dir/annotations/instances_{split}.json` and `out_dir/{split}/*.png` (with RLE
    masks). Unlabelled sets get an annotation file with images and categories only."""
    from pycocotools import mask as mask_utils

    out_dir = Path(out_dir)
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(len(dataset)):
        array, ann = dataset.render(i)
        image_id = dataset.image_ids[i]
        name = f"{image_id:08d}.png"
        Image.fromarray(array).save(out_dir / split / name)
        images.append({"id": image_id, "file_name": name, "height": array.shape[0], "width": array.shape[1]})
        if dataset.mode == "unlabeled":
            continue
        for box, label, m in zip(ann["boxes"], ann["labels"], ann["masks"]):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = box.tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(m.sum()),
                         "iscrowd": 0, "segmentation": rle})
    cats = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(dataset.classes)]
    path = out_dir / "annotations" / f"instances_{split}.json"
    write_json_atomic({"images": images, "annotations": anns, "categories": cats}, path)
    return path


def export_voc(dataset: SyntheticDetection, out_dir, split: str = "trainval", year: str = "2007") -> Path:
    """Write the VOC layout `out_dir/VOC{year}/{Annotations, JPEGImages, ImageSets/Main/{split}.txt}`
    with 1-based inclusive pixel boxes and difficult flags. Returns the VOC{year} root."""
    root = Path(out_dir) / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    stems = []
    for i in range(len(dataset)):
        array, ann = dataset.render(i)
        stem = f"{year}_{dataset.image_ids[i]:06d}"
        stems.append(stem)
        Image.fromarray(array).save(root / "JPEGImages" / f"{stem}.jpg", quality=95)
        a = ET.Element("annotation")
        ET.SubElement(a, "folder").text = f"VOC{year}"
        ET.SubElement(a, "filename").text = f"{stem}.jpg"
        size = ET.SubElement(a, "size")
        for k, v in zip(("width", "height", "depth"), (array.shape[1], array.shape[0], 3)):
            ET.SubElement(size, k).text = str(v)
        for box, label, diff in zip(ann["boxes"], ann["labels"], ann["difficult"]):
            o = ET.SubElement(a, "object")
            ET.SubElement(o, "name").text = dataset.classes[int(label) - 1]
            ET.SubElement(o, "pose").text = "Unspecified"
            ET.SubElement(o, "truncated").text = "0"
            ET.SubElement(o, "difficult").text = str(int(diff))
            bb = ET.SubElement(o, "bndbox")
            x1, y1, x2, y2 = (int(round(v)) for v in box.tolist())
            for k, v in zip(("xmin", "ymin", "xmax", "ymax"), (x1 + 1, y1 + 1, x2, y2)):
                ET.SubElement(bb, k).text = str(v)
        ET.ElementTree(a).write(root / "Annotations" / f"{stem}.xml")
    split_file = root / "ImageSets" / "Main" / f"{split}.txt"
    tmp = split_file.with_name(split_file.name + ".tmp")
    tmp.write_text("\n".join(stems) + "\n")
    os.replace(tmp, split_file)
    return root


def export_imagefolder(dataset: SyntheticDetection, out_dir) -> Path:
    """Write an object-mode set as `out_dir/<class>/<id>.png` (the ImageNet layout)."""
    if dataset.mode != "object":
        raise ValueError("export_imagefolder needs mode='object' (an image-level label per image)")
    out_dir = Path(out_dir)
    for name in dataset.classes:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    for i in range(len(dataset)):
        array, ann = dataset.render(i)
        cls = dataset.classes[int(ann["labels"][0]) - 1]
        Image.fromarray(array).save(out_dir / cls / f"{dataset.image_ids[i]:08d}.png")
    return out_dir


