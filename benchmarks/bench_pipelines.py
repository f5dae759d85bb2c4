"""CPU cost of one training sample of each script's data pipeline, at the papers' resolutions.

What one sample is (the work a DataLoader worker does for it, JPEG decode included):
- soco: one pre-training sample, ImageNet-like JPEG -> V1 (224), V2 (224), V3 (112), the K = 4
  proposals in each, every view colour-augmented and normalised (`soco.SoCoViews`).
- jigsaw: one assembled 224 image from four samples (`jigsaw.JigsawAssembly`, COCO-like JPEGs).
- ssod: one student sample: a labelled image (weak view at 800 / 1333) plus an unlabelled one
  (weak view for the teacher, strong view for the student) (`ssod_certainty.SemiSupervisedSet`).
- dap: one pseudo-box input at both CAM scales, 288 and 576 (`dap.CamInputs`, batches of 8,
  per image), ImageNet-like JPEGs; plus the share of a 64-image batch's 576-px canvas that is
  padding, in loader order and with batches grouped by orientation.
- detection: the plain detection loader, COCO-like JPEG -> 800 / 1333 + flip
  (`common.data.CocoDetection` + `detection_transforms`).

The files are real formats written from the synthetic set: COCO-like 640x480 JPEGs with a COCO
JSON (a 640-px scene with its top and bottom 80 rows cut), ImageNet-like 500x375 JPEGs in class
folders (a 500-px object image, its middle 375 rows; every fourth one portrait, 375x500, as
ImageNet holds both). Times are process CPU time (`time.process_time`) over `--samples` samples
after a warm-up, in this one process (run it pinned to one core with one thread:
`taskset -c N env OMP_NUM_THREADS=1`). `--before` also measures today's pipelines as they were
before issue 19 (`benchmarks/reference_pipelines.py`, frozen copies) for the before / after table.

The last line printed is one JSON object: {"soco": {"cpu_ms": x, ...}, "jigsaw": ..., "ssod": ...,
"dap": ..., "detection": ...} (`cpu_ms`: the pipeline as the scripts run it now; `before_cpu_ms`
with --before; `target_ms`: issue 19's target).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/bench_pipelines.py --before
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import SeededDataset, build_detection_dataset, detection_transforms, subset_by_ids  # noqa: E402
from common.data import ImageFolderDataset, write_json_atomic  # noqa: E402
from common.synthetic import SHAPES, SyntheticDetection  # noqa: E402

TARGETS_MS = {"soco": 20.0, "jigsaw": 15.0, "ssod": 100.0, "dap": 20.0, "detection": None}
JPEG_QUALITY = 90


# --------------------------------------------------------------------------------------------
# Real-format files written from the synthetic set
# --------------------------------------------------------------------------------------------
def write_coco_like(root: Path, n: int, seed: int = 0, split: str = "train2017") -> Path:
    """`root/annotations/instances_{split}.json` + `root/{split}/*.jpg`: 640x480 scenes."""
    ds = SyntheticDetection(n, 640, seed=seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        array, ann = ds.render(i, masks=False)
        array = array[80:560]  # 640 x 480
        name = f"{i + 1:012d}.jpg"
        Image.fromarray(array).save(root / split / name, quality=JPEG_QUALITY)
        images.append({"id": i + 1, "file_name": name, "height": 480, "width": 640})
        for box, label in zip(ann["boxes"], ann["labels"]):
            x1, y1, x2, y2 = box.tolist()
            y1, y2 = min(max(y1 - 80, 0), 480), min(max(y2 - 80, 0), 480)
            if x2 - x1 >= 2 and y2 - y1 >= 2:
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(label), "iscrowd": 0,
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    cats = [{"id": k + 1, "name": name} for k, name in enumerate(SHAPES)]
    write_json_atomic({"images": images, "annotations": anns, "categories": cats},
                      root / "annotations" / f"instances_{split}.json")
    return root


def write_imagenet_like(root: Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """`root/{split}/<class>/*.JPEG`: 500x375 object images (every fourth one 375x500)."""
    ds = SyntheticDetection(n, 500, mode="object", seed=seed)
    for i in range(n):
        array, ann = ds.render(i, masks=False)
        array = array[62:437] if i % 4 else array[:, 62:437]
        folder = root / split / SHAPES[int(ann["labels"][0]) - 1]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(array)).save(folder / f"{i:08d}.JPEG", quality=JPEG_QUALITY)
    return root


# --------------------------------------------------------------------------------------------
# One sample of each pipeline: a callable i -> whatever a loader worker would hand over
# --------------------------------------------------------------------------------------------
def soco_sample(imagenet: Path, tmp: Path, reference: bool = False):
    import soco

    args = soco.get_args_parser().parse_args(["--data", str(imagenet), "--proposals", str(tmp / "proposals")])
    source = soco.build_image_source(args)
    table = soco.proposal_table(tmp / "proposals")
    if not table.complete:  # boxes as the Sec. 3.2 filter leaves them (selective search itself is offline)
        boxes, counts, sizes = [], [], []
        for i in range(len(source)):
            h, w = source[i][0].shape[-2:]
            b = soco.random_proposals(w, h, 60)
            boxes.append(np.round(b).astype(np.uint16))
            counts.append(len(b))
            sizes.append((h, w))
        table.write(counts, {"source": soco.source_fingerprint(source)}, boxes=np.concatenate(boxes),
                    sizes=np.asarray(sizes, np.int32))
    if reference:
        from benchmarks.reference_pipelines import ReferenceSoCoViews as Views
    else:
        Views = soco.SoCoViews
    dataset = SeededDataset(Views(source, soco.proposal_table(tmp / "proposals"), args), seed=0)
    return lambda i: dataset[i % len(dataset)]


def jigsaw_sample(coco: Path, tmp: Path, reference: bool = False):
    import jigsaw

    args = jigsaw.get_args_parser().parse_args(["--data", str(coco), "--out", str(tmp / "jigsaw")])
    if reference:
        from benchmarks.reference_pipelines import reference_jigsaw_data

        dataset = reference_jigsaw_data(args)
    else:
        dataset = jigsaw.build_pretrain_data(args)
    dataset = SeededDataset(dataset, seed=0)
    return lambda i: dataset[i % len(dataset)]


def ssod_sample(coco: Path, reference: bool = False):
    import ssod_certainty as ssod

    args = ssod.parse_args(["--data", str(coco), "--output-dir", "/nonexistent"])
    train = build_detection_dataset(str(coco), "train2017", train=True)
    half = len(train) // 2
    labeled, unlabeled = subset_by_ids(train, train.image_ids[:half]), subset_by_ids(train, train.image_ids[half:])
    weak = detection_transforms(True, args.train_scales, args.max_size)
    if reference:
        from benchmarks.reference_pipelines import ReferenceSemiSupervisedSet as Set, reference_strong_augmentation

        dataset = Set(labeled, unlabeled, weak, reference_strong_augmentation(args))
    else:
        dataset = ssod.SemiSupervisedSet(labeled, unlabeled, weak, ssod.strong_augmentation(args))
    dataset = SeededDataset(dataset, seed=0)
    # one student sample = a labelled image + an unlabelled one (the student draws from their union)
    return lambda i: (dataset[i % half], dataset[half + i % (len(dataset) - half)])


def dap_sample(imagenet: Path, reference: bool = False, batch: int = 8):
    import dap

    images = ImageFolderDataset(imagenet / "train")
    if reference:
        from benchmarks.reference_pipelines import ReferenceCamInputs as Collate
    else:
        Collate = dap.CamInputs
    collate = Collate([288, 576])

    def sample(i):  # one batch of `batch` per call; cpu_ms is divided by `batch` below
        return collate([(k, images[(i * batch + k) % len(images)]) for k in range(batch)])

    return sample, batch


def detection_sample(coco: Path):
    dataset = SeededDataset(build_detection_dataset(str(coco), "train2017", train=True,
                                                    transforms=detection_transforms(True, (800,), 1333)), seed=0)
    return lambda i: dataset[i % len(dataset)]


def padding_share(sizes: np.ndarray, scale: int = 576, batch: int = 64, grouped: bool = False, seed: int = 0) -> float:
    """Share of the (batch, 3, H, W) canvases at short side `scale` (padded to the batch's largest,
    multiples of 32) that is padding, over one shuffled epoch of images with `sizes` (N, 2) h, w."""
    order = np.random.default_rng(seed).permutation(len(sizes))
    if grouped:  # portrait and landscape images in separate batches (common.data.GroupedBatchSampler)
        portrait = sizes[order, 0] > sizes[order, 1]
        order = np.concatenate([order[~portrait], order[portrait]])
    f = scale / sizes.min(1)
    hw = np.maximum(1, np.round(sizes * f[:, None]))
    hw = np.ceil(hw / 32) * 32
    used = padded = 0.0
    for s in range(0, len(order) - batch + 1, batch):
        b = hw[order[s:s + batch]]
        used += (b[:, 0] * b[:, 1]).sum()
        padded += len(b) * b[:, 0].max() * b[:, 1].max()
    return float(1 - used / padded) if padded else 0.0


def cpu_ms(sample, n: int, warmup: int = 3, per_call: int = 1) -> float:
    for i in range(warmup):
        sample(10_000 + i)
    t = time.process_time()
    for i in range(n // per_call):
        sample(i)
    return 1e3 * (time.process_time() - t) / ((n // per_call) * per_call)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200, help="samples timed per pipeline (at least 200 for the table)")
    p.add_argument("--images", type=int, default=48, help="JPEG files written per format (cycled)")
    p.add_argument("--only", nargs="*", default=list(TARGETS_MS), choices=list(TARGETS_MS))
    p.add_argument("--before", action="store_true", help="also time the pipelines as they were before issue 19")
    p.add_argument("--data", default="", help="folder for the files (kept; default: a temporary folder)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {platform.node()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"affinity {sorted(os.sched_getaffinity(0))}", flush=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(a.data or t)
        coco, imagenet = tmp / "coco", tmp / "imagenet"
        if not (coco / "annotations").is_dir():
            write_coco_like(coco, a.images)
        if not (imagenet / "train").is_dir():
            write_imagenet_like(imagenet, a.images)
        result = {}
        for name in a.only:
            paths = [False, True] if a.before and name != "detection" else [False]
            row = {}
            for reference in paths:
                per_call = 1
                if name == "soco":
                    sample = soco_sample(imagenet, tmp / ("ref" if reference else "new"), reference)
                elif name == "jigsaw":
                    sample = jigsaw_sample(coco, tmp / ("ref" if reference else "new"), reference)
                elif name == "ssod":
                    sample = ssod_sample(coco, reference)
                elif name == "dap":
                    sample, per_call = dap_sample(imagenet, reference)
                else:
                    sample = detection_sample(coco)
                ms = cpu_ms(sample, a.samples, per_call=per_call)
                row["before_cpu_ms" if reference else "cpu_ms"] = round(ms, 2)
                print(f"{name:9s} {'before' if reference else 'now':6s} {ms:8.2f} CPU-ms per sample", flush=True)
            if name == "dap":
                images = ImageFolderDataset(imagenet / "train")
                sizes = np.resize(np.array([images[i][0].shape[-2:] for i in range(len(images))]), (6400, 2))
                row["padding_share_576"] = {"loader_order": round(padding_share(sizes), 3),
                                            "grouped": round(padding_share(sizes, grouped=True), 3)}
                print(f"dap       padding at 576, batches of 64: {row['padding_share_576']}")
            row["target_ms"] = TARGETS_MS[name]
            result[name] = row
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
