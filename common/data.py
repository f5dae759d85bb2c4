"""Datasets for every script: COCO / VOC / ImageFolder loaders, box-aware `transforms.v2`
pipelines, samplers and subset helpers (the built-in synthetic dataset is `common.synthetic`).

Conventions (see common/README.md): detection labels are 1..C (0 = background), boxes x1 y1 x2 y2
in continuous 0-based pixels, annotations held as flat arrays (one table for the whole dataset,
per-image offsets) so that a DataLoader worker does not copy millions of small Python objects.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import xml.etree.ElementTree as ET
import zlib
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from .distributed import get_rank, get_world_size

# --------------------------------------------------------------------------------------------
# Class lists, targets, JSON
# --------------------------------------------------------------------------------------------
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def _target_tensors(ann: dict, hw: tuple[int, int]) -> dict:
    t = {"boxes": tv_tensors.BoundingBoxes(torch.as_tensor(ann["boxes"], dtype=torch.float32),
                                           format="XYXY", canvas_size=hw),
         "labels": torch.as_tensor(ann["labels"], dtype=torch.int64)}
    for key in ("difficult", "iscrowd"):
        if key in ann:
            t[key] = torch.as_tensor(ann[key], dtype=torch.bool)
    if "area" in ann:
        t["area"] = torch.as_tensor(ann["area"], dtype=torch.float32)
    return t


def write_json_atomic(obj, path: Path) -> None:
    """json.dumps(obj) to a temporary file beside `path`, then rename (never half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Loaders of the real formats
# --------------------------------------------------------------------------------------------
def _load_image(path: Path) -> tv_tensors.Image:
    """uint8 (3, H, W) RGB; a missing, empty or undecodable file is an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"empty image file: {path} (0 bytes); remove it from the annotations or restore it")
    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot decode image {path}: {e}") from e
    return tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def _pack(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as one flat uint8 array and offsets (N + 1,): nothing per item for a worker to copy."""
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in items])]).astype(np.int64)
    return np.frombuffer(b"".join(items), np.uint8), offsets


def _unpack(data: np.ndarray, offsets: np.ndarray, i: int) -> bytes:
    return data[offsets[i]:offsets[i + 1]].tobytes()


class _FlatDetection(Dataset):
    """Annotations of every image in flat arrays: boxes (M, 4), labels (M,), flags (M,), and
    per-image offsets (N + 1,). Subclasses fill them and implement `_path(i)` (and `_masks(i)`
    when they load instance masks)."""

    classes: tuple
    transforms = None

    def _finish(self, per_image: list[dict], sizes):
        counts = [len(a["labels"]) for a in per_image]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        cat = lambda key, dtype, shape: (np.concatenate([np.asarray(a[key], dtype).reshape(shape) for a in per_image])
                                         if per_image else np.zeros((0, *shape[1:]), dtype))
        self.boxes = cat("boxes", np.float32, (-1, 4))
        self.labels = cat("labels", np.int64, (-1,))
        self.difficult = cat("difficult", bool, (-1,))
        self.iscrowd = cat("iscrowd", bool, (-1,))
        self.area = cat("area", np.float32, (-1,))
        self.sizes = np.asarray(sizes, np.int64).reshape(-1, 2)  # (N, 2) h, w

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image_size(self, i: int) -> tuple[int, int]:
        h, w = self.sizes[i]
        return int(h), int(w)

    def annotations(self, i: int) -> dict:
        s, e = self.offsets[i], self.offsets[i + 1]
        return {"boxes": self.boxes[s:e], "labels": self.labels[s:e], "difficult": self.difficult[s:e],
                "iscrowd": self.iscrowd[s:e], "area": self.area[s:e]}

    def _masks(self, i: int):
        return None

    def __getitem__(self, i: int):
        image = _load_image(self._path(i))
        h, w = image.shape[-2:]
        target = {"image_id": self.image_ids[i], **_target_tensors(self.annotations(i), (h, w))}
        masks = self._masks(i)
        if masks is not None:
            if masks.shape[-2:] != (h, w):
                raise ValueError(f"{self._path(i)} is {w}x{h} pixels but its annotation says "
                                 f"{masks.shape[-1]}x{masks.shape[-2]}; fix 'width' / 'height' of image id "
                                 f"{self.image_ids[i]}")
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def _clean_boxes(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """Clip to the image; True where the box keeps a positive width and height."""
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def _read_coco_json(ann_file: Path) -> dict:
    """The annotation file as a dict with 'images' and 'annotations' lists, or an error naming it."""
    expected = "a JSON object with 'images', 'annotations' and 'categories' lists (instances_<split>.json)"
    try:
        data = json.loads(ann_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed COCO annotation file {ann_file}: {e!r}") from e
    if not isinstance(data, dict):
        raise ValueError(f"COCO annotation file {ann_file} holds a JSON {type(data).__name__}; expected {expected}")
    for key in ("images", "annotations", "categories"):
        if key == "categories" and key not in data:
            continue  # no category: only an annotation naming one is an error
        if not isinstance(data.get(key), list):
            hint = (" (an image-info file such as image_info_unlabeled2017.json lists images only: add "
                    "\"annotations\": [] to use its images unlabelled)" if key == "annotations" else "")
            raise ValueError(f"COCO annotation file {ann_file} has no {key!r} list (keys: {sorted(data)}); "
                             f"expected {expected}{hint}")
    if not data["images"]:
        raise ValueError(f"COCO annotation file {ann_file} lists no image ('images' is empty)")
    return data


def _segmentation_mask(seg, h: int, w: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed RLE as in crowd regions, or compressed RLE) as a
    (h, w) uint8 mask, as pycocotools' `COCO.annToMask`."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        if not seg:
            return np.zeros((h, w), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle)


class CocoDetection(_FlatDetection):
    """COCO-format detection: `image_dir/` + `ann_file` (instances_*.json). Category ids are mapped
    to contiguous labels 1..C in sorted id order (`cat_ids[k - 1]` is label k's id).

    `train=False` (evaluation): every image and every box as written (not clipped, degenerate boxes
    kept, so the ground truth is pycocotools'), crowd regions flagged in `iscrowd`. `train=True`
    (as Detectron2 and torchvision's references): crowd annotations dropped, boxes clipped to the
    image, degenerate ones dropped (counted in `num_dropped_boxes`), and images left without a box
    dropped. `masks=True` adds `target["masks"]` (`tv_tensors.Mask`, (N, H, W) uint8) decoded from
    the polygons / RLE with pycocotools; the segmentations are kept as flat bytes, decoded per item."""

    LAYOUT = "<root>/annotations/instances_<split>.json and the images in <root>/<split>/"

    def __init__(self, image_dir, ann_file, transforms=None, train: bool = False, masks: bool = False):
        from pycocotools.coco import COCO

        image_dir, ann_file = Path(image_dir), Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}. Expected layout: {self.LAYOUT}")
        if not image_dir.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {image_dir}. Expected layout: {self.LAYOUT}")
        data = _read_coco_json(ann_file)
        try:
            with redirect_stdout(StringIO()):
                coco = COCO()
                coco.dataset = data
                coco.createIndex()
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed COCO annotation file {ann_file}: {e!r}; every image needs an 'id', "
                             f"every annotation an 'id' and an 'image_id', every category an 'id'") from e
        self.image_dir, self.ann_file, self.transforms = image_dir, ann_file, transforms
        self.train, self.with_masks = train, masks
        self.cat_ids = sorted(coco.getCatIds())
        cat_to_label = {c: k + 1 for k, c in enumerate(self.cat_ids)}
        self.classes = tuple(coco.cats[c].get("name", str(c)) for c in self.cat_ids)
        self.image_ids, self.file_names, segmentations = [], [], []
        self.num_dropped_boxes = 0
        per_image, sizes = [], []
        for image_id in sorted(coco.getImgIds()):
            info = coco.imgs[image_id]
            missing = [k for k in ("file_name", "height", "width") if k not in info]
            if missing:
                raise ValueError(f"image id {image_id} in {ann_file} has no {missing} (every entry of 'images' "
                                 f"needs 'id', 'file_name', 'height' and 'width')")
            h, w = int(info["height"]), int(info["width"])
            anns = coco.imgToAnns.get(image_id, [])
            for a in anns:
                if not isinstance(a.get("bbox"), (list, tuple)) or len(a["bbox"]) != 4:
                    raise ValueError(f"malformed annotation id {a.get('id')} in {ann_file}: "
                                     f"'bbox' must be [x, y, width, height], got {a.get('bbox')!r}")
                if a.get("category_id") not in cat_to_label:
                    raise ValueError(f"annotation id {a.get('id')} in {ann_file} has category_id "
                                     f"{a.get('category_id')!r}, which is not in 'categories'")
                if masks and not isinstance(a.get("segmentation"), (list, dict)):
                    raise ValueError(f"masks=True, but annotation id {a.get('id')} in {ann_file} has no "
                                     f"'segmentation' (polygons or RLE); train a box-only detector instead")
            xywh = np.asarray([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            crowd = np.asarray([a.get("iscrowd", 0) for a in anns], bool)
            keep = np.ones(len(anns), bool)
            if train:
                valid = _clean_boxes(boxes, h, w)
                self.num_dropped_boxes += int((~valid & ~crowd).sum())
                keep = valid & ~crowd
                if not keep.any():
                    continue  # no usable box: not a training image (Detectron2, torchvision references)
            self.image_ids.append(image_id)
            self.file_names.append(info["file_name"])
            per_image.append({
                "boxes": boxes[keep],
                "labels": np.asarray([cat_to_label[a["category_id"]] for a in anns], np.int64)[keep],
                "iscrowd": crowd[keep],
                "difficult": np.zeros(int(keep.sum()), bool),
                "area": np.asarray([a.get("area", 0.0) for a in anns], np.float32)[keep]})
            sizes.append((h, w))
            if masks:
                segmentations += [json.dumps(a["segmentation"]).encode() for a, k in zip(anns, keep) if k]
        if self.num_dropped_boxes:
            warnings.warn(f"{ann_file}: dropped {self.num_dropped_boxes} degenerate boxes (zero width or "
                          f"height after clipping to the image)")
        if not self.image_ids:
            raise ValueError(f"no training image left in {ann_file}: every image has only crowd or degenerate "
                             f"boxes, or none")
        self._finish(per_image, sizes)
        if masks:
            self._segmentations = _pack(segmentations)

    def _path(self, i: int) -> Path:
        return self.image_dir / self.file_names[i]

    def _masks(self, i: int):
        if not self.with_masks:
            return None
        h, w = self.image_size(i)
        found = [_segmentation_mask(json.loads(_unpack(*self._segmentations, j)), h, w)
                 for j in range(self.offsets[i], self.offsets[i + 1])]
        return np.stack(found) if found else np.zeros((0, h, w), np.uint8)


class VOCDetection(_FlatDetection):
    """Pascal VOC XML: one root (`VOCdevkit/VOC2007`) or several (VOC07+12: a list of roots, or a
    comma-joined string). VOC's 1-based inclusive boxes become continuous 0-based boxes
    (x1 - 1, y1 - 1, x2, y2), the convention under which the devkit's `+1` IoU is plain IoU.

    Class list (never the names found in one split, which would shift labels between splits):
    `classes` (names, or a text file with one name per line), else the devkit's 20 classes when
    every name is one of them, else the sorted union of the names in every XML under the roots'
    `Annotations/`. `train=False` (evaluation): every image, boxes as written, difficult flagged.
    `train=True`: boxes clipped to the image, degenerate ones dropped (counted in
    `num_dropped_boxes`), images left without a box dropped; difficult boxes stay (Detectron2's
    `load_voc_instances` trains on them; `keep_difficult=False` drops them, as maskrcnn-benchmark).
    `image_ids` are positions in the split files' order, the same with `train` True or False."""

    LAYOUT = ("<root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg and "
              "<root>/ImageSets/Main/<image_set>.txt, with <root> like VOCdevkit/VOC2007")

    def __init__(self, root, image_set: str = "trainval", transforms=None, keep_difficult: bool = True,
                 classes=None, train: bool = False):
        if isinstance(root, (str, Path)):
            root = str(root).split(",")
        roots = [Path(r) for r in root]
        self.transforms, self.train, paths, records = transforms, train, [], []
        for r in roots:
            split_file = r / "ImageSets" / "Main" / f"{image_set}.txt"
            for needed in (r / "Annotations", r / "JPEGImages", split_file):
                if not needed.exists():
                    raise FileNotFoundError(f"VOC path not found: {needed}. Expected layout: {self.LAYOUT}")
            stems = split_file.read_text().split()
            if not stems:
                raise ValueError(f"VOC split file {split_file} lists no image id (an empty {image_set!r} split); "
                                 f"it should hold one image id (file stem) per line")
            for stem in stems:
                xml = r / "Annotations" / f"{stem}.xml"
                records.append(self._parse(xml))
                paths.append(r / "JPEGImages" / records[-1]["filename"])
        self.classes = self._class_list(classes, roots, {n for rec in records for n in rec["names"]})
        index = {n: k + 1 for k, n in enumerate(self.classes)}
        self.image_ids, self.paths = [], []
        self.num_dropped_boxes = 0
        per_image, sizes = [], []
        for k, rec in enumerate(records):
            boxes = rec["boxes"]
            keep = np.ones(len(boxes), bool) if keep_difficult else ~rec["difficult"]
            if train:
                valid = _clean_boxes(boxes, rec["h"], rec["w"])
                self.num_dropped_boxes += int((~valid).sum())
                keep &= valid
                if not keep.any():
                    continue
            self.image_ids.append(k)
            self.paths.append(paths[k])
            per_image.append({"boxes": boxes[keep],
                              "labels": np.asarray([index[n] for n in rec["names"]], np.int64)[keep],
                              "difficult": rec["difficult"][keep], "iscrowd": np.zeros(int(keep.sum()), bool),
                              "area": ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[keep]})
            sizes.append((rec["h"], rec["w"]))
        if self.num_dropped_boxes:
            warnings.warn(f"VOC {roots}: dropped {self.num_dropped_boxes} degenerate boxes")
        if not self.image_ids:
            raise ValueError(f"no training image left in the {image_set!r} split of {roots}: no image has a box")
        self._finish(per_image, sizes)

    @classmethod
    def _class_list(cls, classes, roots, names: set) -> tuple:
        source = "the classes given"
        if isinstance(classes, (str, Path)):
            source = str(classes)
            if not Path(classes).is_file():
                raise FileNotFoundError(f"class list file not found: {classes} (one class name per line)")
            classes = Path(classes).read_text().split()
            if not classes:
                raise ValueError(f"class list file {source} is empty (one class name per line)")
        elif classes is None:
            if names <= set(VOC_CLASSES):
                return VOC_CLASSES
            classes = sorted({n for r in roots for xml in sorted((r / "Annotations").glob("*.xml"))
                              for n in cls._parse(xml)["names"]})
            source = f"the union of the names in {[str(r / 'Annotations') for r in roots]}"
        unknown = sorted(names - set(classes))
        if unknown:
            raise ValueError(f"VOC annotations under {[str(r) for r in roots]} name classes {unknown} that are "
                             f"not in {source} ({list(classes)}); list every class of every split there")
        return tuple(classes)

    @staticmethod
    def _parse(xml: Path) -> dict:
        if not xml.is_file():
            raise FileNotFoundError(f"VOC annotation not found: {xml} (listed in ImageSets/Main)")
        try:
            root = ET.parse(xml).getroot()
            size = root.find("size")
            w, h = int(size.find("width").text), int(size.find("height").text)
            names, boxes, difficult = [], [], []
            for obj in root.iter("object"):
                bb = obj.find("bndbox")
                x1, y1, x2, y2 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
                names.append(obj.find("name").text.strip())
                boxes.append([x1 - 1, y1 - 1, x2, y2])
                d = obj.find("difficult")
                difficult.append(d is not None and int(d.text) == 1)
            filename = root.find("filename").text.strip() if root.find("filename") is not None else f"{xml.stem}.jpg"
        except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"malformed VOC annotation {xml}: {e!r}; expected <size><width/><height/></size> "
                             f"and <object><name/><difficult/><bndbox><xmin/><ymin/><xmax/><ymax/></bndbox></object>") from e
        return {"names": names, "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
                "difficult": np.asarray(difficult, bool), "h": h, "w": w, "filename": filename}

    def _path(self, i: int) -> Path:
        return self.paths[i]


class ImageFolderDataset(Dataset):
    """ImageNet layout: `root/<class>/<image>`; items are (image, label 0..C-1). The file list is
    held as flat arrays (the relative paths' UTF-8 bytes with offsets, and the labels), so that
    1.28M images neither copy a list of tuples into every worker nor stop the dataset from being
    pickled (DataLoader workers under spawn / forkserver)."""

    def __init__(self, root, transform=None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        layout = "<root>/<class name>/<image>.jpg (one folder per class, as ImageNet's train/ and val/)"
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolder root not found: {root}. Expected layout: {layout}")
        try:
            classes, class_to_idx = find_classes(root)
            # allow_empty: a small set (or an export of one) may have a class folder with no image;
            # the class still keeps its index
            samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        except (FileNotFoundError, RuntimeError) as e:
            raise FileNotFoundError(f"no class folders under {root}: {e}. Expected layout: {layout}") from e
        if not samples:
            raise FileNotFoundError(f"no images in the class folders under {root}. Expected layout: {layout}")
        self.root, self.transform, self.classes = root, transform, tuple(classes)
        self._paths = _pack([os.path.relpath(path, root).encode() for path, _ in samples])
        self.targets = np.asarray([label for _, label in samples], np.int64)

    def __len__(self):
        return len(self.targets)

    def relpath(self, i: int) -> str:
        """Path of image `i` relative to `root` (`<class>/<file>`)."""
        return _unpack(*self._paths, i).decode()

    def __getitem__(self, i):
        image = _load_image(self.root / self.relpath(i))
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])


def _split_seed(seed: int, split: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(split.encode())) % 2**31


def build_detection_dataset(data: str, split: str, transforms=None, num_images: int = 512,
                            image_size: int = 128, seed: int = 0, train: bool = False, masks: bool = False,
                            classes=None, **synthetic_kwargs):
    """`data`: "synthetic" (a split-specific seed), a COCO root, a VOC root, or comma-joined VOC
    roots (VOC07+12). `split` names the COCO split (train2017), the VOC image set (trainval).
    `train=True` for a training set (crowd boxes and images without a usable box dropped),
    `train=False` for evaluation (every image, boxes as written); see `CocoDetection`. `masks`:
    COCO instance masks (the synthetic set always has them; VOC has none). `classes`: VOC's class
    list (names or a file, one per line). The synthetic set has no crowd and no degenerate box:
    `train` changes nothing there."""
    if data == "synthetic":
        from .synthetic import SyntheticDetection

        return SyntheticDetection(num_images, image_size, seed=_split_seed(seed, split), transforms=transforms,
                                  **synthetic_kwargs)
    first = Path(data.split(",")[0])
    if (first / "annotations").is_dir():
        if classes is not None:
            raise ValueError(f"--data {data!r} is COCO: its classes are the 'categories' of the annotation "
                             f"file; a class list applies to VOC only")
        return CocoDetection(first / split, first / "annotations" / f"instances_{split}.json", transforms,
                             train=train, masks=masks)
    if (first / "Annotations").is_dir():
        if masks:
            raise ValueError(f"--data {data!r} is VOC, whose XML has no instance masks; masks need a COCO "
                             f"dataset (or use a box-only detector)")
        return VOCDetection(data, split, transforms, classes=classes, train=train)
    raise FileNotFoundError(
        f"--data {data!r}: not 'synthetic' and no dataset layout found there. Expected a COCO root "
        f"({CocoDetection.LAYOUT}) or a VOC root ({VOCDetection.LAYOUT}; VOC07+12 as "
        f"'VOCdevkit/VOC2007,VOCdevkit/VOC2012').")


def build_classification_dataset(data: str, split: str, transform=None, num_images: int = 512,
                                 image_size: int = 128, seed: int = 0, **synthetic_kwargs):
    """`data`: "synthetic" (object-centric images) or an ImageFolder root with `{root}/{split}/<class>/`."""
    if data == "synthetic":
        from .synthetic import SyntheticDetection

        ds = SyntheticDetection(num_images, image_size, mode="object", seed=_split_seed(seed, split),
                                **synthetic_kwargs)
        return ds.classification(transform)
    return ImageFolderDataset(Path(data) / split, transform)


# --------------------------------------------------------------------------------------------
# Box-aware augmentation (torchvision.transforms.v2)
# --------------------------------------------------------------------------------------------
PER_BOX_FIELDS = ("labels", "iscrowd", "difficult", "area", "masks")


def per_box_fields(inputs):
    """`labels_getter` of `v2.SanitizeBoundingBoxes`: every per-box tensor of the target (labels,
    crowd / difficult flags, area, masks), so that a dropped box takes all of them with it."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return [target[k] for k in PER_BOX_FIELDS if torch.is_tensor(target.get(k))]


def detection_transforms(train: bool, scales=(800,), max_size: int = 1333, hflip: float = 0.5):
    """Training: shortest side drawn from `scales` (capped by `max_size`), horizontal flip, float,
    then boxes under 1 px dropped with every per-box field (`per_box_fields`). Evaluation: float
    only; the detector resizes and maps its boxes back to the original image."""
    if not train:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
    ops = [v2.RandomShortestSize(list(scales), max_size)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops += [v2.ToDtype(torch.float32, scale=True),
            v2.SanitizeBoundingBoxes(min_size=1, labels_getter=per_box_fields)]
    return v2.Compose(ops)


def classification_transforms(train: bool, size: int = 224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """ImageNet-style: random resized crop + flip for training, resize + centre crop for evaluation."""
    if train:
        ops = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        ops = [v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class SeededDataset(Dataset):
    """Makes an item's random augmentation a function of (seed, epoch, index) alone: the same on
    any number of workers, and exactly reproduced when a run resumes mid-epoch."""

    def __init__(self, dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed
        # the epoch lives in shared memory, so that persistent DataLoader workers (which keep their
        # copy of this object across epochs) see set_epoch too
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):  # classes, image_ids, annotations, image_size of the wrapped set
        if name in ("dataset", "_epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(i))) % 2**62)
            return self.dataset[i]


def collate_detection(batch):
    """(list of images, list of targets): detectors take images of different sizes."""
    return tuple(zip(*batch))


class GroupedBatchSampler(Sampler):
    """Batches from a DistributedSampler's order in which every image has the same aspect-ratio
    group (landscape / portrait), so padding to the batch's largest image wastes little. Leftovers
    form mixed batches at the end; the count of batches is the same on every rank. `set_epoch`
    reshuffles and can skip the first `start_batch` batches (exact resume mid-epoch)."""

    def __init__(self, sampler: DistributedSampler, group_ids, batch_size: int, drop_last: bool = True):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.group_ids = None if group_ids is None else np.asarray(group_ids)
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def _batches(self):
        indices = list(self.sampler)
        if self.group_ids is None:
            yield from BatchSampler(indices, self.batch_size, self.drop_last)
            return
        buckets, leftovers = {}, []
        for i in indices:
            b = buckets.setdefault(int(self.group_ids[i]), [])
            b.append(i)
            if len(b) == self.batch_size:
                yield list(b)
                b.clear()
        for b in buckets.values():
            leftovers += b
        yield from BatchSampler(leftovers, self.batch_size, self.drop_last)

    def __iter__(self):
        for k, batch in enumerate(self._batches()):
            if k >= self.start_batch:
                yield batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def build_loader(dataset, batch_size: int, train: bool, workers: int = 4, seed: int = 0,
                 collate_fn=collate_detection, group_by_aspect_ratio: bool = True,
                 persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard. `batch_size` is per rank. Training: shuffled, seeded
    augmentation (`SeededDataset`), aspect-ratio groups, full batches only; evaluation: in order,
    every image once (the DistributedSampler's padding is removed when predictions are gathered).
    `persistent_workers`: the worker processes live across epochs (no re-fork per epoch; `set_epoch`
    still reaches them)."""
    world, rank = get_world_size(), get_rank()
    if train:
        dataset = SeededDataset(dataset, seed)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed)
    if train and len(sampler) < batch_size:
        raise ValueError(f"the training set has {len(dataset)} images, {len(sampler)} per rank over {world} "
                         f"rank(s): fewer than the per-rank batch of {batch_size}. Lower --batch-size or add data.")
    groups = None
    if train and group_by_aspect_ratio and hasattr(dataset, "image_size"):
        groups = [int(h > w) for h, w in (dataset.image_size(i) for i in range(len(dataset)))]
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size, drop_last=train)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_fn,
                      pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(seed),
                      persistent_workers=persistent_workers and workers > 0)


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Reshuffle (and reseed augmentation) for `epoch`, skipping `start_batch` batches."""
    loader.batch_sampler.set_epoch(epoch, start_batch)
    if isinstance(loader.dataset, SeededDataset):
        loader.dataset.set_epoch(epoch)


# --------------------------------------------------------------------------------------------
# Subsets saved as image ids (identical on every rank and every rerun)
# --------------------------------------------------------------------------------------------
class DetectionSubset(Dataset):
    """The images `indices` of a detection dataset, keeping its annotation interface."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, list(indices)
        self.classes = dataset.classes
        self.image_ids = [dataset.image_ids[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]

    def annotations(self, i, **kw):
        return self.dataset.annotations(self.indices[i], **kw)

    def image_size(self, i):
        return self.dataset.image_size(self.indices[i])


def subset_by_ids(dataset, ids) -> DetectionSubset:
    """The images whose ids are in `ids` (in the dataset's order); unknown ids are an error."""
    pos = {image_id: i for i, image_id in enumerate(dataset.image_ids)}
    missing = [i for i in ids if i not in pos]
    if missing:
        raise KeyError(f"{len(missing)} image ids of the split are not in the dataset (first: {missing[:5]}); "
                       f"was the split made for another dataset?")
    return DetectionSubset(dataset, sorted(pos[i] for i in set(ids)))


def kshot_subset(dataset, k: int, seed: int = 0) -> list[int]:
    """k-shot training set: k x C distinct image ids (C classes), every class present in at least k
    of them (DAP: 5-shot on COCO's 80 classes is 400 images).

    Algorithm: the images holding each class (any of its boxes) are put in a seeded random order;
    classes are served from the rarest (fewest images) to the most common, each taking the first
    k of its images not already taken. Each class thus owns k images of its own, and the result
    depends only on the annotations and `seed`. A class left with fewer than k free images takes
    what there is (fewer than k x C ids; a warning names it)."""
    if k < 1:
        raise ValueError(f"k-shot needs k >= 1, got {k}")
    rng = np.random.default_rng(seed)
    holders = [[] for _ in range(len(dataset.classes) + 1)]  # holders[c]: indices of the images with class c
    for i in range(len(dataset)):
        for c in np.unique(dataset.annotations(i)["labels"]):
            holders[int(c)].append(i)
    chosen, short = set(), []
    for c in sorted(range(1, len(holders)), key=lambda c: (len(holders[c]), c)):
        free = [int(i) for i in rng.permutation(holders[c]) if int(i) not in chosen]
        chosen.update(free[:k])
        if len(free) < k:
            short.append(dataset.classes[c - 1])
    if short:
        warnings.warn(f"{k}-shot: classes {short} have fewer than {k} images not taken by rarer classes; "
                      f"{len(chosen)} images instead of {k * (len(holders) - 1)}")
    return sorted(dataset.image_ids[i] for i in chosen)


def fraction_split(dataset, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(labelled ids, unlabelled ids): a seeded draw *without* replacement of round(fraction * N)
    images (at least 1) as labelled; the rest unlabelled."""
    if not 0 < fraction <= 1:
        raise ValueError(f"labelled fraction must be in (0, 1], got {fraction}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    n = max(1, int(round(fraction * len(dataset))))
    ids = np.asarray(dataset.image_ids)
    return sorted(ids[order[:n]].tolist()), sorted(ids[order[n:]].tolist())


def save_split(path, ids: dict) -> None:
    """Write {name: [image ids]} as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({k: [int(i) for i in v] for k, v in ids.items()}, path)


def load_split(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    return json.loads(path.read_text())
