"""The built-in synthetic detection dataset (rendered deterministically from a seed) and its export
to the real formats (COCO JSON, VOC XML, ImageFolder), so every loader and script can be tried
without downloading anything."""
from __future__ import annotations

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


class SyntheticDetection(Dataset):
    """Coloured, textured shapes (8 classes told apart by shape) on cluttered backgrounds.

    Every image is a pure function of `(seed, index)`; nothing is stored. Modes:
    - "scenes": `min_objects..max_objects` objects of varied scale (about 10-50% of the side) and
      aspect ratio (0.6-1.7), small rotations and some occlusion (a later, smaller object may cover
      up to about half of an earlier one). Targets: boxes (tight on the visible pixels), labels,
      masks (visible pixels), difficult (visible fraction < 0.6 or short side < 6 px).
    - "object": one dominant class per image (1 object, or 2-3 of the same class), large (about
      30-75% of the side); the target holds only the image-level label `image_label` (0..C-1); the
      true boxes are kept aside in `annotations(i)`.
    - "unlabeled": scenes whose target holds only `image_id`; the truth is in `annotations(i)`.
    `long_tail=r` draws classes with geometrically falling frequency, most / least frequent = r.
    """

    classes = SHAPES

    def __init__(self, num_images: int, image_size: int = 128, mode: str = "scenes", seed: int = 0,
                 min_objects: int = 2, max_objects: int = 6, long_tail: float | None = None,
                 transforms=None):
        if mode not in _MODES:
            raise ValueError(f"unknown synthetic mode {mode!r}; choose one of {_MODES}")
        if num_images < 1 or image_size < 32:
            raise ValueError("synthetic dataset needs num_images >= 1 and image_size >= 32")
        self.num_images, self.size, self.mode, self.seed = num_images, image_size, mode, seed
        self.min_objects, self.max_objects = min_objects, max_objects
        self.transforms = transforms
        c = len(SHAPES)
        p = np.ones(c) if not long_tail else float(long_tail) ** (-np.arange(c) / (c - 1))
        self.class_probs = p / p.sum()
        self.image_ids = list(range(1, num_images + 1))
        self.num_dropped_boxes = 0

    def __len__(self) -> int:
        return self.num_images

    def image_size(self, i: int) -> tuple[int, int]:
        return self.size, self.size

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _MODES.index(self.mode), i, stream])

    def _layout(self, i: int):
        """Classes, visible masks (N, S, S) of the image `i`; geometry only, no colours."""
        rng, size = self._rng(i, 0), self.size
        if self.mode == "object":
            cls = int(rng.choice(len(SHAPES), p=self.class_probs))
            n = 1 if rng.random() < 0.7 else int(rng.integers(2, 4))
            classes = [cls] * n
            rel = (0.3, 0.75) if n == 1 else (0.25, 0.45)
        else:
            n = int(rng.integers(self.min_objects, self.max_objects + 1))
            classes = rng.choice(len(SHAPES), size=n, p=self.class_probs).tolist()
            rel = (0.1, 0.5)
        sides = np.sort(size * np.exp(rng.uniform(math.log(rel[0]), math.log(rel[1]), n)))[::-1]
        full, visible, kept = [], [], []
        for c, side in zip(classes, sides):  # largest first: smaller objects lie on top
            for _ in range(20):
                ar = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
                w, h = side * math.sqrt(ar), side / math.sqrt(ar)
                w, h = min(w, size * 0.95), min(h, size * 0.95)
                cx, cy = rng.uniform(w / 2, size - w / 2), rng.uniform(h / 2, size - h / 2)
                m = _draw_mask(_PARTS[SHAPES[c]], cx, cy, w, h, rng.uniform(-0.3, 0.3), size)
                if m.sum() < 12:
                    continue
                # keep every earlier object at least half visible
                if all((v & ~m).sum() >= 0.5 * f.sum() for v, f in zip(visible, full)):
                    visible = [v & ~m for v in visible]
                    full.append(m)
                    visible.append(m.copy())
                    kept.append(c)
                    break
        return kept, visible, full

    def annotations(self, i: int, masks: bool = False) -> dict:
        """Ground truth of image `i` (any mode) without rendering colours."""
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

    def render(self, i: int) -> tuple[np.ndarray, dict]:
        """(uint8 image (S, S, 3), annotations with masks)."""
        layout = self._layout(i)
        classes, visible, full = layout
        rng = self._rng(i, 1)
        img = _background(rng, self.size)
        for v in visible:
            ys, xs = np.nonzero(v)
            y1, x1, y2, x2 = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
            tex = _texture(rng, y2 - y1, x2 - x1) * rng.uniform(0.75, 1.1)
            crop = v[y1:y2, x1:x2]
            img[y1:y2, x1:x2][crop] = tex[crop]
        img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
        return (img * 255).round().astype(np.uint8), self._annotations(*layout, masks=True)

    def __getitem__(self, i: int):
        array, ann = self.render(i)
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


class ClassificationView(Dataset):
    def __init__(self, dataset: SyntheticDetection, transform=None):
        self.dataset, self.transform, self.classes = dataset, transform, dataset.classes

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        array, ann = self.dataset.render(i)
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1).contiguous())
        if self.transform is not None:
            image = self.transform(image)
        return image, int(ann["labels"][0]) - 1


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


