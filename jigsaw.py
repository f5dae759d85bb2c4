"""Jigsaw pre-training: pre-train a detector's backbone on the detection dataset itself.

Paper: "Cheaper Pre-training Lunch: An Efficient Paradigm for Object Detection", Zhou, Zhou, Zhang,
Yi, Ouyang, ECCV 2020 (arXiv:2004.12178). Text copy: ../shared/papers/jigsaw.txt. No public code.

What the file does, in the paper's order:
1. Sample selection (Sec. 3.1), `extract_samples`: positives are ground-truth boxes enlarged at
   random (each corner moves outwards, width/height up to 2x, truncated at the image edges);
   negatives are random boxes with IoU = 0 against every positive sample of their image (the
   enlarged boxes: "negative samples are exclusive with those positive ones"), 10 positives : 1
   negative. Written once as a (C + 1)-class table of flat numpy arrays (source image index, box,
   label, the sample's pixels), memory-mapped by every loader worker.
2. Jigsaw assembly (Sec. 3.2, Fig. 4), `JigsawAssembly` / `fit_to_region`: 2 S + 1 T + 1 W samples per
   image (S: aspect w/h in [0.5, 1.5], T: < 0.5, W: > 1.5); smaller S top-left, W top-right,
   T bottom-left, larger S bottom-right; pad & crop (default), warp or resize (Table 1); per-sample
   resize ratio in [0.8, 1.5] and flip p=0.5 before stitching, ImageNet normalisation after.
3. Classification strategies (Sec. 3.3, Table 2): `global_loss`, `blockwise_loss` and the default
   ERF-adaptive dense classification:
   - Eq. 1 (soft label per feature position)      -> `soft_labels`
   - Eq. 2 (ERF-adaptive weights, tau = 0.7)      -> `erf_label_weights`
   - dense soft cross-entropy, averaged per region, then over the regions -> `erf_adaptive_loss`
   - the ERF of every feature position from input gradients -> `effective_receptive_fields`,
     refreshed every `--erf-every` (5k) iterations.
4. Optimisation (Sec. 4.1): SGD momentum 0.9, weight decay 1e-4, 512 assembled images per batch,
   64k iterations, LR warm-up 0.2 -> 0.8 over 1250 iterations then cosine to 0 (`pretrain`).
5. Fine-tuning (Sec. 4.1, Tables 3 and 5), `finetune`: Faster R-CNN C4 / FPN or Mask R-CNN from
   the Jigsaw backbone (frozen BN, 13 epochs, LR steps at epochs 9 and 12), and the from-scratch
   GroupNorm baseline (norm "gn", every layer trained) for the equal-compute comparison.
6. Fig. 6: `erf_figure` draws which input pixels drive the top-left region's features.

CHOICE: template (Fig. 4's numbers are missing from the text): a square input of `--input-size`
    (224) cut at `--split` (64) px along both axes: R1 top-left 64x64 (smaller S), R2 top-right
    160x64 w x h (W, aspect 2.5), R3 bottom-left 64x160 (T, aspect 0.4), R4 bottom-right 160x160
    (larger S). Every region's aspect ratio lies inside its group's range and both cuts fall on the
    stride-32 grid of the last feature map, so every feature position lies in exactly one region.
CHOICE: enlargement: each of the four box sides moves outwards by U(0, 0.5) x the box's width
    (left, right) or height (top, bottom), so width and height grow by a factor in [1, 2].
CHOICE: negatives: candidate boxes whose sqrt(area) is log-uniform in [0.1, 0.5] x the image's
    sqrt(area) and aspect ratio log-uniform in [1/3, 3], at most 50 tries per negative; an image
    gets as many negatives as keep the running count at floor(positives so far / 10), so the
    whole table keeps 10 : 1. Negatives get class label C (positives 0..C-1).
CHOICE: the crops the paper saves "as classification dataset beforehand" are stored as JPEG
    (quality 95, no chroma subsampling) bytes in one flat file at extraction (`write_crops`, which
    decodes each image once); assembly decodes these four small crops (PIL) and stitches them in
    uint8, about a third of the CPU of cutting them from four decoded images.
CHOICE: zero padding is placed at a random offset inside the region (crops are random too), and is
    black before normalisation (the paper normalises after stitching). An empty aspect group
    borrows the 10% of samples nearest to its range (with a warning).
CHOICE: ERF (the notes): |d (sum over channels of X[:, j, k]) / d input| summed over colour
    channels, in eval mode, averaged over `--erf-images` (16) assembled training images drawn with
    a fixed seed; computed on rank 0 at step 0 and every `--erf-every` steps, then broadcast. So
    Eq. 2's weights depend on the feature position only and serve every image of the template (the
    paper refreshes them every 5k iterations, so they cannot be per image); Eq. 1 mixes each
    image's own four region labels with them.
CHOICE: Eq. 2 edge cases: a position whose ERF is all zero gets its own region's one-hot label;
    when the ERF lies entirely in the position's own region the other weights are 0 (0/0 := 0).
CHOICE: the 1x1 conv classifier of the dense strategy is the ResNet's `fc` applied at every
    position, so the pre-trained checkpoint is a plain torchvision ResNet state dict; block-wise
    and global classification apply the same `fc` to region / global averages.
CHOICE: fine-tuning warm-up (not stated): 500 iterations linear from 0.001 x LR (Detectron's);
    the stem and res2 stay frozen (Detectron's FREEZE_AT=2, torchvision's trainable_layers=3).
CHOICE: the from-scratch baseline (Tab. 5) swaps the ResNet's BN for GroupNorm (32 groups) and
    trains every layer; the detector heads are the same as in fine-tuning. Its LR steps are the 1x
    schedule's (9/13 and 12/13 of training) stretched to its budget.
NOTE: --arch mask_rcnn needs instance masks in the targets: the built-in synthetic data has them,
    common.data's COCO loader reads them (polygons and RLE); VOC has none (the run stops there).
CHOICE: a VOC validation set is scored as Detectron2's PascalVOCDetectionEvaluator does (devkit AP,
    difficult objects ignored, the 11-point metric on VOC2007, AP the mean over IoU 0.50:0.95;
    `common.evaluation`), COCO by COCOeval.
CHOICE: equal compute (Table 5, "GPU days"): pre-training and fine-tuning record their compute as
    they run (`ComputeMeter`: `compute_seconds` of each rank's training loop, ERF refreshes
    included, sample extraction and evaluation not; GPU wall-clock on CUDA, the process's CPU time
    on the CPU, so that other jobs on a shared machine do not count), in the checkpoint (carried
    across --resume) and in OUT/<stage>/compute.json. The from-scratch run gets their sum over
    ranks (`--scratch-budget-s auto`) as iterations at its own compute per iteration, measured on
    the DDP-wrapped model (gradient all-reduce included) over `--calibrate-iters` steps; its own
    compute is recorded and reported beside the budget.
DEVIATION: the CPU demo (`--demo`) runs on the benchmark's synthetic 64-px scenes (400 training,
    300 held-out) at common.demo's recipe (ResNet-18 with trainable BN, AdamW, one-cycle LR; the
    pre-training uses the recipe's classifier optimiser, the detectors its detector training), not
    the paper's SGD schedules: a 192-px template cut at 64 px (R1 spans 2x2 feature cells; R3's
    aspect 0.5 sits on the T / S boundary), samples resized by 2 x [0.8, 1.5] (the scenes' objects,
    13-35 px, are far smaller against the template than COCO's), batch 8, 200 iterations (the
    loss falls from 2.3 to 2.0, seeds 0-2), Eq. 2's weights from one image at steps 0 and 100;
    fine-tuning 120 steps; Faster R-CNN R18-FPN (`build_demo_detector`), not C4:
    at 64 px C4's res5 box head on every RoI made a training step 2-3x and evaluation 3-7x dearer
    than FPN on this CPU, which the demo's budget cannot hold. Tab. 5: the GroupNorm detector from
    scratch trains until its own CPU time reaches the ERF-adaptive run's measured pre-training +
    fine-tuning CPU time, its one-cycle LR spread over that budget (`train_demo_detector_on_budget`;
    steps planned from a calibration on the untrained detector overran the budget by 22-47 %: a
    detector's step gets dearer as it trains). Tab. 2: the three strategies with the same
    pre-training and fine-tuning (a table, no claim).
Full scale (COCO train2017 on 8 GPUs, ResNet-50, then Faster R-CNN C4 fine-tuning):
    python jigsaw.py --stage extract --data /data/coco --out runs/jigsaw     # the sample table, once
    torchrun --nproc_per_node 8 jigsaw.py --stage pretrain --data /data/coco --out runs/jigsaw
    torchrun --nproc_per_node 8 jigsaw.py --stage finetune --data /data/coco --out runs/jigsaw \
        --arch faster_rcnn_c4
    torchrun --nproc_per_node 8 jigsaw.py --stage scratch --data /data/coco --out runs/jigsaw \
        --arch faster_rcnn_c4   # the compute the two stages above recorded (--scratch-budget-s auto)
    torchrun --nproc_per_node 8 jigsaw.py --stage benchmark --data /data/coco --out runs/jigsaw
    python jigsaw.py --stage erf-figure --data /data/coco --out runs/jigsaw \
        --checkpoints ERF-adaptive=runs/jigsaw/pretrain/checkpoint.pth ImageNet=torchvision random=random
CPU demo (Tab. 5 and Tab. 2 into OUT/demo.json; the tests run it at a smaller size):
    python jigsaw.py --demo --seed 0 --out runs/jigsaw_demo
    python -m common.demo --script jigsaw.py --seeds 0 1 2      # mean +- std into results/jigsaw.md
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.ops import box_iou

from common import data as cdata
from common import distributed as cdist
from common import engine
from common.detectors import build_classifier, build_detector
from common.evaluation import evaluate_detector, evaluation_metric

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # Sec. 4.1, ImageNet normalisation


# ---------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("Jigsaw pre-training (Zhou et al., ECCV 2020)", add_help=True)
    g = p.add_argument_group("paper hyper-parameters (defaults: the paper's main setting)")
    g.add_argument("--stage", default="pretrain",
                   choices=("extract", "pretrain", "finetune", "scratch", "erf-figure", "benchmark"))
    g.add_argument("--strategy", default="erf", choices=("erf", "blockwise", "global"),
                   help="Sec. 3.3 / Tab. 2: ERF-adaptive dense (default), block-wise or global classification")
    g.add_argument("--tau", type=float, default=0.7, help="Eq. 2 threshold (Sec. 4.1, Fig. 7a)")
    g.add_argument("--erf-every", type=int, default=5000, help="refresh Eq. 2's weights every N iterations (Sec. 3.3)")
    g.add_argument("--fit", default="padcrop", choices=("padcrop", "warp", "resize"),
                   help="fitting a sample to its region (Sec. 3.2, Tab. 1)")
    g.add_argument("--input-size", type=int, default=224, help="assembled image side (CHOICE, Fig. 4)")
    g.add_argument("--split", type=int, default=64, help="template cut position in px (CHOICE, Fig. 4)")
    g.add_argument("--neg-ratio", type=float, default=0.1, help="negatives per positive (Sec. 3.1: 10 : 1)")
    g.add_argument("--max-enlarge", type=float, default=2.0, help="box width/height grow up to this factor (Sec. 3.1)")
    g.add_argument("--scale-range", type=float, nargs=2, default=(0.8, 1.5), help="per-sample resize ratio (Sec. 4.1)")
    g.add_argument("--backbone", default="resnet50", help="Sec. 4.2 (ResNet-50)")
    g.add_argument("--iters", type=int, default=64000, help="pre-training iterations (Sec. 4.1)")
    g.add_argument("--batch-size", type=int, default=512, help="global batch of assembled images (Sec. 4.1)")
    g.add_argument("--lr", type=float, default=0.8, help="peak LR at batch 512 (Sec. 4.1)")
    g.add_argument("--warmup-iters", type=int, default=1250, help="Sec. 4.1")
    g.add_argument("--warmup-lr", type=float, default=0.2, help="LR at the start of warm-up, batch 512 (Sec. 4.1)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="Sec. 4.1")
    g.add_argument("--momentum", type=float, default=0.9, help="Sec. 4.1")
    g.add_argument("--arch", default="faster_rcnn_c4", choices=("faster_rcnn_c4", "faster_rcnn_fpn", "mask_rcnn"),
                   help="fine-tuning detector (Tab. 3)")
    g.add_argument("--det-epochs", type=int, default=13, help="1x schedule (Sec. 4.1)")
    g.add_argument("--det-steps", type=int, nargs="*", default=(9, 12), help="LR x0.1 at these epochs (Sec. 4.1)")
    g.add_argument("--det-batch-size", type=int, default=16, help="global detection batch (Sec. 4.1)")
    g.add_argument("--det-lr", type=float, default=0.02, help="detection LR at batch 16 (Sec. 4.1)")
    g.add_argument("--det-warmup-iters", type=int, default=500, help="CHOICE (Detectron's default)")
    g.add_argument("--min-size", type=int, default=800, help="detection short side (Sec. 4.1)")
    g.add_argument("--max-size", type=int, default=1333, help="detection long side (Sec. 4.1)")
    g.add_argument("--scratch-budget-s", default="auto",
                   help="stage scratch: the compute budget (seconds over all ranks) that sets its iterations "
                        "(Tab. 5); 'auto': the Jigsaw run's pre-training + fine-tuning compute, as recorded in "
                        "OUT/pretrain/compute.json and OUT/finetune/compute.json; 0: train --det-epochs")
    g.add_argument("--calibrate-iters", type=int, default=20,
                   help="stage scratch: iterations timed to turn the budget into iterations")

    s = p.add_argument_group("system")
    s.add_argument("--data", default="synthetic", help="'synthetic', a COCO root or a VOC root (common.data)")
    s.add_argument("--train-split", default="train2017")
    s.add_argument("--val-split", default="val2017")
    s.add_argument("--num-images", type=int, default=512, help="synthetic data: images per split")
    s.add_argument("--image-size", type=int, default=128, help="synthetic data: image side")
    s.add_argument("--samples", default="", help="sample table folder (default OUT/samples)")
    s.add_argument("--weights", default="", help="stage finetune: backbone checkpoint (default OUT/pretrain/checkpoint.pth)")
    s.add_argument("--checkpoints", nargs="*", default=(),
                   help="stage erf-figure: NAME=PATH pairs (PATH 'random': a random initialisation; "
                        "'torchvision' or 'torchvision:<NAME>': torchvision's ImageNet weights, Fig. 6 (d))")
    s.add_argument("--erf-images", type=int, default=16, help="assembled images the ERF is averaged over (CHOICE)")
    s.add_argument("--out", default="runs/jigsaw")
    s.add_argument("--workers", type=int, default=4)
    s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    s.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on the CPU")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", default="", help="checkpoint to continue the stage from; 'auto': "
                                                "OUT/<stage>/checkpoint.pth when there is one, else a fresh run")
    s.add_argument("--checkpoint-every", type=int, default=1000, help="iterations between pre-training checkpoints")
    s.add_argument("--log-every", type=int, default=20)
    s.add_argument("--det-kwargs", default="{}", help="JSON dict passed to build_detector (e.g. anchor_sizes)")
    s.add_argument("--demo", action="store_true", help="the CPU demo: Tab. 5 (Jigsaw vs scratch at equal compute) and "
                                                         "Tab. 2 on synthetic scenes, into OUT/demo.json")
    s.add_argument("--demo-strategies", nargs="+", default=("erf", "blockwise", "global"),
                   choices=("erf", "blockwise", "global"),
                   help="--demo: the Tab. 2 rows to train (erf is always trained: Tab. 5 compares it with scratch)")
    return p


# ---------------------------------------------------------------------------------------------
# Sample selection (Sec. 3.1), written once as a (C + 1)-class table
# ---------------------------------------------------------------------------------------------
TABLE_FILES = ("image_index.npy", "boxes.npy", "labels.npy")
CROP_FILES = ("crops.bin", "crop_offsets.npy")  # every sample's pixels as JPEG bytes (write_crops)


def enlarge_boxes(boxes: np.ndarray, hw: tuple[int, int], rng: np.random.Generator,
                  max_enlarge: float = 2.0) -> np.ndarray:
    """Sec. 3.1, Fig. 2: move the top-left and bottom-right corners outwards at random, so width and
    height grow by up to `max_enlarge`x, then truncate at the image edges. boxes (N, 4) x1y1x2y2."""
    h, w = hw
    wh = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, 1)  # (N, 4): w, h, w, h
    grow = rng.uniform(0, (max_enlarge - 1) / 2, boxes.shape) * wh  # per side, CHOICE: U(0, 0.5)
    out = boxes + grow * np.array([-1, -1, 1, 1], np.float32)
    return np.clip(out, 0, [w, h, w, h]).astype(np.float32)


def random_negatives(gt: np.ndarray, hw: tuple[int, int], count: int, rng: np.random.Generator,
                     tries: int = 50) -> np.ndarray:
    """Sec. 3.1: up to `count` random boxes with IoU = 0 against every box of `gt` (N, 4): the
    image's positive samples (the enlarged boxes, which hold the ground truth) and crowd regions."""
    h, w = hw
    out = []
    for _ in range(count):
        for _ in range(tries):
            side = math.sqrt(h * w) * math.exp(rng.uniform(math.log(0.1), math.log(0.5)))  # CHOICE
            ar = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
            bw, bh = min(w, side * math.sqrt(ar)), min(h, side / math.sqrt(ar))
            x1, y1 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            cand = np.array([[x1, y1, x1 + bw, y1 + bh]], np.float32)
            if len(gt) == 0 or box_iou(torch.from_numpy(cand), torch.from_numpy(gt)).max() == 0:
                out.append(cand[0])
                break
    return np.asarray(out, np.float32).reshape(-1, 4)


def extract_samples(dataset, out_dir, seed: int = 0, neg_ratio: float = 0.1, max_enlarge: float = 2.0) -> Path:
    """Write the (C + 1)-class sample table of a common.data detection dataset to `out_dir`:
    image_index.npy (N,) int64, boxes.npy (N, 4) float32 x1y1x2y2, labels.npy (N,) int64 (0..C-1
    objects, C background), the crops (`write_crops`), meta.json. Atomic: written to a temporary
    folder, then renamed."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    C = len(dataset.classes)
    index, boxes, labels = [], [], []
    n_pos, n_wanted, skipped = 0, 0, 0
    for i in range(len(dataset)):
        ann, hw = dataset.annotations(i), dataset.image_size(i)
        gt = np.asarray(ann["boxes"], np.float32).reshape(-1, 4)
        crowd = np.asarray(ann.get("iscrowd", np.zeros(len(gt))), bool)  # crowd regions: no positive, no negative
        pos = enlarge_boxes(gt[~crowd], hw, rng, max_enlarge)
        n_pos += len(pos)
        want = int(math.floor(n_pos * neg_ratio + 1e-9)) - n_wanted  # 10 : 1 over the whole table
        n_wanted += want
        neg = random_negatives(np.concatenate([pos, gt[crowd]]), hw, want, rng)  # IoU(pos, neg) = 0
        skipped += want - len(neg)
        index += [i] * (len(pos) + len(neg))
        boxes += [pos, neg]
        labels += [np.asarray(ann["labels"], np.int64)[~crowd] - 1, np.full(len(neg), C, np.int64)]
    if not index:
        raise ValueError("the detection dataset holds no boxes: nothing to extract")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    labels = np.concatenate(labels)
    for name, arr in zip(TABLE_FILES, (np.asarray(index, np.int64), np.concatenate(boxes), labels)):
        np.save(tmp / name, arr)
    write_crops(dataset, tmp, np.load(tmp / "image_index.npy"), np.load(tmp / "boxes.npy"))
    meta = {"classes": list(dataset.classes) + ["background"], "num_images": len(dataset), "seed": seed,
            "positives": int((labels < C).sum()), "negatives": int((labels == C).sum()),
            "negatives_not_found": skipped}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def crop_box(box, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The whole pixels (x1, y1, x2, y2) of a sample box in an image of size hw: outwards to the
    pixel grid, at least one pixel, inside the image."""
    H, W = hw
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, y1 = min(int(math.floor(x1)), W - 1), min(int(math.floor(y1)), H - 1)
    x2, y2 = max(int(math.ceil(x2)), x1 + 1), max(int(math.ceil(y2)), y1 + 1)
    return x1, y1, min(x2, W), min(y2, H)


def write_crops(dataset, folder: Path, image_index: np.ndarray, boxes: np.ndarray, quality: int = 95) -> None:
    """Every sample's pixels, cut once from its decoded image and stored as a JPEG (`quality`, no
    chroma subsampling) in folder/crops.bin, sample k at bytes crop_offsets[k]:crop_offsets[k + 1]
    (crop_offsets.npy): the paper's crops saved "as classification dataset beforehand" (Sec. 3.1),
    so that an assembled image decodes four small crops instead of four whole images."""
    offsets, current, image = [0], -1, None
    with open(folder / CROP_FILES[0], "wb") as f:
        for k in range(len(image_index)):  # samples come grouped by image: each image decoded once
            if int(image_index[k]) != current:
                current = int(image_index[k])
                image = dataset[current][0].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
            x1, y1, x2, y2 = crop_box(boxes[k], image.shape[:2])
            buffer = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(image[y1:y2, x1:x2])).save(buffer, "JPEG", quality=quality,
                                                                             subsampling=0)
            f.write(buffer.getvalue())
            offsets.append(offsets[-1] + buffer.tell())
    np.save(folder / CROP_FILES[1], np.asarray(offsets, np.int64))


def load_sample_table(path) -> dict:
    """The table written by `extract_samples`, memory-mapped (shared by every loader worker). A
    table extracted without crops (before they were stored) has none: its samples are cut from the
    source images."""
    path = Path(path)
    missing = [f for f in TABLE_FILES + ("meta.json",) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"sample table {path} lacks {missing}; run --stage extract first")
    table = {f[:-4]: np.load(path / f, mmap_mode="r") for f in TABLE_FILES}
    if all((path / f).is_file() for f in CROP_FILES):
        table["crops"] = np.memmap(path / CROP_FILES[0], np.uint8, mode="r")
        table["crop_offsets"] = np.load(path / CROP_FILES[1], mmap_mode="r")
    table["meta"] = json.loads((path / "meta.json").read_text())
    return table


# ---------------------------------------------------------------------------------------------
# Jigsaw assembly (Sec. 3.2, Fig. 4): the template, per-sample augmentation (Sec. 4.1), the assembled images
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A square `size` input cut at `split` px on both axes (CHOICE, see the header).
    Regions, in the order R1..R4: top-left (smaller S), top-right (W), bottom-left (T), bottom-right
    (larger S). `stride` is the last feature map's stride (32 for a ResNet)."""
    size: int = 224
    split: int = 64
    stride: int = 32

    def __post_init__(self):
        if self.size % self.stride or self.split % self.stride or not 0 < self.split < self.size:
            raise ValueError(f"template: --input-size {self.size} and --split {self.split} must be multiples of the "
                             f"stride {self.stride} with 0 < split < size, so that no feature cell straddles two regions")

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:  # (x1, y1, x2, y2) in input pixels
        s, c = self.size, self.split
        return [(0, 0, c, c), (c, 0, s, c), (0, c, c, s), (c, c, s, s)]

    @property
    def feature_hw(self) -> tuple[int, int]:
        return self.size // self.stride, self.size // self.stride

    def input_masks(self) -> torch.Tensor:
        """(4, size, size) bool: M^i of Eq. 2, a partition of the input."""
        m = torch.zeros(4, self.size, self.size, dtype=torch.bool)
        for i, (x1, y1, x2, y2) in enumerate(self.boxes):
            m[i, y1:y2, x1:x2] = True
        return m

    def region_of_position(self) -> torch.Tensor:
        """(P,) long: the region r of each feature position (j, k), row-major, from its cell centre."""
        h, w = self.feature_hw
        centre = (torch.arange(h) + 0.5) * self.stride
        below = (centre >= self.split).long()
        return (below[:, None] * 2 + below[None, :]).flatten()  # (P,): 0 TL, 1 TR, 2 BL, 3 BR

    def areas(self) -> torch.Tensor:
        return torch.tensor([float((x2 - x1) * (y2 - y1)) for x1, y1, x2, y2 in self.boxes])


def aspect_groups(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Sample indices of groups S (aspect w/h in [0.5, 1.5]), T (< 0.5) and W (> 1.5) (Sec. 3.2).
    CHOICE: an empty group borrows the 10% of samples nearest to its range."""
    ar = (boxes[:, 2] - boxes[:, 0]) / np.maximum(boxes[:, 3] - boxes[:, 1], 1e-6)
    groups = {"S": np.nonzero((ar >= 0.5) & (ar <= 1.5))[0], "T": np.nonzero(ar < 0.5)[0],
              "W": np.nonzero(ar > 1.5)[0]}
    order = np.argsort(ar, kind="stable")
    k = max(1, len(ar) // 10)
    nearest = {"T": order[:k], "W": order[-k:], "S": np.argsort(np.abs(np.log(ar)), kind="stable")[:k]}
    for g, idx in groups.items():
        if len(idx) == 0:
            warnings.warn(f"aspect group {g} is empty; it borrows the {k} samples nearest to its range")
            groups[g] = np.sort(nearest[g])
    return groups


def fit_to_region(crop: torch.Tensor, hw: tuple[int, int], mode: str, scale: float, flip: bool) -> torch.Tensor:
    """One sample (3, h, w) (uint8, or float in [0, 1]) -> (3, H, W) of the same dtype for a region of
    size `hw` (Sec. 3.2, Tab. 1); uint8 is resized by torch's SIMD uint8 kernel.
    padcrop: resize by `scale` keeping the aspect ratio, then random crop / zero pad per axis;
    warp: resize to the region (shape changes); resize: largest size that fits, aspect kept, then pad."""
    H, W = hw
    h, w = crop.shape[-2:]
    if mode == "warp":
        size = (H, W)
    elif mode == "resize":
        f = min(H / h, W / w)
        size = (max(1, min(H, round(h * f))), max(1, min(W, round(w * f))))
    else:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        x = x.flip(-1)
    out = torch.zeros(3, H, W, dtype=x.dtype)
    h, w = x.shape[-2:]
    # random crop where the sample is larger, random placement of the zero padding where smaller
    sy, sx = int(torch.randint(0, max(0, h - H) + 1, ())), int(torch.randint(0, max(0, w - W) + 1, ()))
    dy, dx = int(torch.randint(0, max(0, H - h) + 1, ())), int(torch.randint(0, max(0, W - w) + 1, ()))
    x = x[:, sy:sy + H, sx:sx + W]
    out[:, dy:dy + x.shape[1], dx:dx + x.shape[2]] = x
    return out


class JigsawAssembly(Dataset):
    """Assembled images (Sec. 3.2, Fig. 4) from the sample table: item -> (image (3, S, S)
    normalised, {"region_labels": (4,) long in the order R1..R4}). Each item draws 2 S, 1 T and 1 W
    samples with torch's global RNG (common.data.SeededDataset makes that a function of
    (seed, epoch, index)); crops come from the table (or, for a table without them, from the source
    images of `dataset`, no transforms).
    An epoch is len(table) / 4 images, i.e. as many sample draws as the table holds samples. The
    groups are drawn 2 : 1 : 1 (S : T : W) whatever their sizes, so a sample is drawn on average
    `draws_per_epoch()[group]` times per epoch: about once only when the groups are balanced; in
    an S-heavy table each T and W sample is drawn several times and each S sample less than once."""

    def __init__(self, dataset, table: dict, template: Template, fit: str = "padcrop",
                 scale_range=(0.8, 1.5)):
        self.dataset, self.template, self.fit, self.scale_range = dataset, template, fit, tuple(scale_range)
        self.image_index, self.boxes, self.labels = table["image_index"], table["boxes"], table["labels"]
        self.crops, self.crop_offsets = table.get("crops"), table.get("crop_offsets")
        self.classes = table["meta"]["classes"]
        boxes = np.asarray(self.boxes)
        self.groups = aspect_groups(boxes)
        self.area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

    def __len__(self) -> int:
        return max(1, len(self.labels) // 4)

    def draws_per_epoch(self) -> dict[str, float]:
        """Expected draws of one sample of each group per epoch: 2 S, 1 T and 1 W per image."""
        per_image = {"S": 2, "T": 1, "W": 1}
        return {g: len(self) * per_image[g] / len(idx) for g, idx in self.groups.items()}

    def _draw(self, group: str) -> int:
        idx = self.groups[group]
        return int(idx[int(torch.randint(0, len(idx), ()))])

    def choose(self) -> list[int]:
        """Sample indices for R1..R4: smaller S top-left, W top-right, T bottom-left, larger S bottom-right.
        The two S samples are distinct (when the group has two)."""
        S = self.groups["S"]
        a = int(torch.randint(0, len(S), ()))
        b = int(torch.randint(0, max(1, len(S) - 1), ()))
        b += int(len(S) > 1 and b >= a)  # uniform over the other S samples
        s1, s2 = int(S[a]), int(S[b])
        if self.area[s1] > self.area[s2]:
            s1, s2 = s2, s1
        return [s1, self._draw("W"), self._draw("T"), s2]

    def crop(self, k: int) -> torch.Tensor:
        """Sample k's pixels, uint8 (3, h, w): its stored crop, else cut from its decoded source image."""
        if self.crops is not None:
            data = self.crops[self.crop_offsets[k]:self.crop_offsets[k + 1]]
            with Image.open(io.BytesIO(data)) as im:
                return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)  # a writable copy
        image = self.dataset[int(self.image_index[k])][0].as_subclass(torch.Tensor)  # (3, H, W) uint8
        x1, y1, x2, y2 = crop_box(self.boxes[k], image.shape[-2:])
        return image[:, y1:y2, x1:x2]

    def __getitem__(self, i: int):
        t = self.template
        canvas = torch.zeros(3, t.size, t.size, dtype=torch.uint8)  # stitched in uint8, normalised once
        chosen = self.choose()
        for k, (x1, y1, x2, y2) in zip(chosen, t.boxes):
            scale = float(torch.empty(()).uniform_(*self.scale_range))
            flip = bool(torch.rand(()) < 0.5)
            canvas[:, y1:y2, x1:x2] = fit_to_region(self.crop(k), (y2 - y1, x2 - x1), self.fit, scale, flip)
        canvas = canvas.float().div_(255).sub_(torch.tensor(MEAN)[:, None, None]).div_(torch.tensor(STD)[:, None, None])
        return canvas, {"region_labels": torch.as_tensor([int(self.labels[k]) for k in chosen], dtype=torch.long)}


# ---------------------------------------------------------------------------------------------
# Classification (Sec. 3.3): the backbone's dense features and the three losses, pure functions
# ---------------------------------------------------------------------------------------------
def backbone_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """X of Sec. 3.3: the ResNet's last feature map before average pooling, (B, D, H/32, W/32)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def dense_logits(net: torch.nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """The 1x1 conv classifier of Fig. 5: the ResNet's fc applied at every position, (B, K, h, w)."""
    return F.conv2d(feats, net.fc.weight[:, :, None, None], net.fc.bias)


def erf_label_weights(erf: torch.Tensor, region_masks: torch.Tensor, region_of_position: torch.Tensor,
                      tau: float = 0.7) -> torch.Tensor:
    """Eq. 2: (P, 4) weights w[p, i] of the four region labels at each feature position p.

    erf (P, H, W) >= 0: G^{j,k} of each position; region_masks (4, H, W) bool: M^i, a partition of
    the input; region_of_position (P,) long: the region r that position p lies in. Each row sums to
    1 and w[p, r] >= tau."""
    G = erf.double().flatten(1)  # (P, HW)
    M = region_masks.flatten(1).double()  # (4, HW)
    r = region_of_position.long()
    mass = G @ M.T  # (P, 4): sum_{h,w} G^{j,k} M^i
    total = G.sum(1)  # (P,): sum_{h,w} G^{j,k}
    own = mass.gather(1, r[:, None]).squeeze(1)  # (P,): mass inside the position's own region
    ratio = torch.where(total > 0, own / total.clamp_min(1e-300), torch.ones_like(total))  # CHOICE: dead ERF -> 1
    w_r = ratio.clamp(min=tau)  # Eq. 2, i = r: max(tau, own / total)
    outside = (G @ (1 - M).T).gather(1, r[:, None]).squeeze(1)  # (P,): sum_{h,w} G^{j,k} (1 - M^r)
    share = torch.where(outside[:, None] > 0, mass / outside.clamp_min(1e-300)[:, None], torch.zeros_like(mass))
    w = (1 - w_r)[:, None] * share  # Eq. 2, i != r: (1 - w_r) mass_i / outside
    w.scatter_(1, r[:, None], w_r[:, None])
    # An ERF entirely inside its own region has w_r = 1 and nothing outside: the row is one-hot.
    return w.to(erf.dtype if erf.is_floating_point() else torch.float32)


def soft_labels(weights: torch.Tensor, region_labels: torch.Tensor, num_classes: int,
                feature_hw: tuple[int, int]) -> torch.Tensor:
    """Eq. 1: y~^{j,k} = sum_i w_i^{j,k} y_i. weights (P, 4), region_labels (B, 4) -> (B, K, h, w)."""
    y = F.one_hot(region_labels, num_classes).to(weights.dtype)  # (B, 4, K)
    y_soft = torch.einsum("pi,bik->bkp", weights, y)  # Eq. 1, (B, K, P)
    return y_soft.reshape(y.shape[0], num_classes, *feature_hw)


def erf_adaptive_loss(logits: torch.Tensor, targets: torch.Tensor, region_of_position: torch.Tensor) -> torch.Tensor:
    """Fig. 5: dense soft-label cross-entropy; the loss map is averaged within each region, then
    over the four regions (and the batch). logits, targets (B, K, h, w); region_of_position (P,)."""
    loss_map = -(targets * F.log_softmax(logits.float(), 1)).sum(1).flatten(1)  # (B, P)
    onehot = F.one_hot(region_of_position, 4).to(loss_map.dtype)  # (P, 4)
    region_loss = loss_map @ onehot / onehot.sum(0)  # (B, 4): block-wise average of the loss map
    return region_loss.mean()


def region_pool(feats: torch.Tensor, region_of_position: torch.Tensor) -> torch.Tensor:
    """Average pooling of the feature map within each of the four regions: (B, D, h, w) -> (B, 4, D)."""
    onehot = F.one_hot(region_of_position, 4).to(feats.dtype)  # (P, 4)
    return torch.einsum("bdp,pi->bid", feats.flatten(2), onehot / onehot.sum(0))


def blockwise_loss(net: torch.nn.Module, feats: torch.Tensor, region_labels: torch.Tensor,
                   region_of_position: torch.Tensor) -> torch.Tensor:
    """Block-wise classification (Sec. 3.3, Fig. B1b): one pooled prediction and hard label per region."""
    logits = net.fc(region_pool(feats, region_of_position))  # (B, 4, K)
    return F.cross_entropy(logits.float().flatten(0, 1), region_labels.flatten())


def global_loss(net: torch.nn.Module, feats: torch.Tensor, region_labels: torch.Tensor, areas: torch.Tensor,
                num_classes: int) -> torch.Tensor:
    """Global classification (Sec. 3.3, Fig. B1a): global average pooling, one label per image that
    mixes the four region labels by region area (as CutMix)."""
    logits = net.fc(feats.mean((2, 3)))  # (B, K)
    y = (F.one_hot(region_labels, num_classes).float() * (areas / areas.sum())[None, :, None]).sum(1)  # (B, K)
    return -(y * F.log_softmax(logits.float(), 1)).sum(1).mean()


def effective_receptive_fields(net: torch.nn.Module, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """ERF (Luo et al. 2016) of every position of the last feature map: (P, H, W), the mean over
    `images` (N, 3, H, W) of |d sum_c X[c, j, k] / d input| summed over colour channels.

    Batched: each image is repeated once per position in a chunk, and position p's activation is
    back-propagated from copy p; eval mode keeps the copies independent (no batch statistics)."""
    was_training = net.training
    net.eval()
    n, _, H, W = images.shape
    with torch.no_grad():
        h, w = backbone_features(net, images[:1]).shape[-2:]
    P = h * w
    erf = torch.zeros(P, H, W, dtype=torch.float64)
    for img in images:
        for start in range(0, P, chunk):
            pos = torch.arange(start, min(P, start + chunk), device=images.device)
            x = img[None].expand(len(pos), -1, -1, -1).clone().requires_grad_(True)
            X = backbone_features(net, x).sum(1).flatten(1)  # (len(pos), P): sum over channels
            (grad,) = torch.autograd.grad(X[torch.arange(len(pos)), pos].sum(), x)
            erf[start:start + len(pos)] += grad.abs().sum(1).double().cpu()
    net.train(was_training)
    return (erf / n).float()


# ---------------------------------------------------------------------------------------------
# Pre-training: train step / loop (Sec. 3.3, Sec. 4.1)
# ---------------------------------------------------------------------------------------------
def pretrain_loss(net, images, region_labels, strategy: str, template: Template, weights, num_classes: int):
    """The loss of one batch of assembled images under the strategy of Sec. 3.3 / Tab. 2."""
    feats = backbone_features(net, images)  # X: (B, D, h, w)
    rop = template.region_of_position().to(images.device)
    if strategy == "erf":
        targets = soft_labels(weights.to(images.device), region_labels, num_classes, feats.shape[-2:])  # Eq. 1
        return erf_adaptive_loss(dense_logits(net, feats), targets, rop)
    if strategy == "blockwise":
        return blockwise_loss(net, feats, region_labels, rop)
    return global_loss(net, feats, region_labels, template.areas().to(images.device), num_classes)


class JigsawModel(torch.nn.Module):
    """The ResNet and its pre-training loss in one forward, so that DDP sees every parameter used.
    Its state dict holds `resnet.*` keys, which common.detectors.load_weights maps into any detector."""

    def __init__(self, resnet: torch.nn.Module, strategy: str, template: Template, num_classes: int):
        super().__init__()
        self.resnet, self.strategy, self.template, self.num_classes = resnet, strategy, template, num_classes

    def forward(self, images, region_labels, weights=None):
        return pretrain_loss(self.resnet, images, region_labels, self.strategy, self.template, weights,
                             self.num_classes)


def fixed_images(dataset: JigsawAssembly, n: int, seed: int) -> torch.Tensor:
    """`n` assembled training images drawn with a fixed seed (CHOICE): the ERF's inputs, the same at
    every refresh and for every model compared in Fig. 6. (n, 3, S, S)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)
        return torch.stack([dataset[i][0] for i in range(n)])


class ErfWeights:
    """Eq. 2's (P, 4) weights, refreshed from the network's ERF every `every` steps (rank 0 computes
    them on a fixed set of assembled images, then broadcasts); saved with the checkpoint."""

    def __init__(self, resnet, dataset, tau: float, every: int, total: int, num_images: int, seed: int, device):
        self.resnet, self.template, self.tau, self.device = resnet, dataset.template, tau, device
        self.every, self.total = every, total
        self.images = fixed_images(dataset, num_images, seed)
        self.weights = None

    def refresh(self) -> None:
        w = None
        if cdist.is_main():
            t = self.template
            erf = effective_receptive_fields(self.resnet, self.images.to(self.device))
            w = erf_label_weights(erf, t.input_masks(), t.region_of_position(), self.tau)  # Eq. 2
        self.weights = cdist.broadcast_object(w)

    def on_step_end(self, step: int) -> None:
        if step % self.every == 0 and step < self.total:
            self.refresh()

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"]


def build_pretrain_data(args) -> JigsawAssembly:
    """The sample table (extracted once, by rank 0) and the assembly dataset over it."""
    samples = Path(args.samples or Path(args.out) / "samples")
    source = cdata.build_detection_dataset(args.data, args.train_split, num_images=args.num_images,
                                           image_size=args.image_size, seed=args.seed, train=True)
    if cdist.is_main() and not (samples / "meta.json").is_file():
        t0 = time.time()
        extract_samples(source, samples, args.seed, args.neg_ratio, args.max_enlarge)
        meta = json.loads((samples / "meta.json").read_text())
        print(f"[extract] {samples}: {meta['positives']} positives, {meta['negatives']} negatives "
              f"from {meta['num_images']} images in {time.time() - t0:.1f}s")
    cdist.barrier()
    table = load_sample_table(samples)
    if table["meta"]["num_images"] != len(source):
        raise ValueError(f"sample table {samples} was extracted from {table['meta']['num_images']} images, but "
                         f"--data holds {len(source)}: remove the folder or pass another --samples")
    dataset = JigsawAssembly(source, table, Template(args.input_size, args.split), args.fit, args.scale_range)
    if cdist.is_main():
        print(f"[samples] an epoch is {len(dataset)} assembled images; draws per sample per epoch: "
              + ", ".join(f"{g} {v:.2f} ({len(dataset.groups[g])} samples)" for g, v in dataset.draws_per_epoch().items()))
    return dataset


def pretrain_dir(args) -> Path:
    return Path(args.out) / ("pretrain" if args.strategy == "erf" else f"pretrain_{args.strategy}")


def pretrain(args, env, max_steps: int | None = None) -> Path:
    """Jigsaw pre-training with the shared loop; returns OUT/pretrain*/checkpoint.pth. `max_steps`
    stops early (as an interrupted run would), leaving a checkpoint that --resume continues."""
    out = pretrain_dir(args)
    dataset = build_pretrain_data(args)
    K = len(dataset.classes)  # C + 1
    # --batch-size is the global batch of assembled images; each rank takes batch / world, and the
    # paper's LR (0.8 at 512) scales linearly with the global batch.
    per_rank = args.batch_size // env.world_size
    lr = args.lr * args.batch_size / 512
    loader = cdata.build_loader(dataset, per_rank, train=True, workers=args.workers, seed=args.seed,
                                group_by_aspect_ratio=False, persistent_workers=True)  # no re-fork per epoch
    cdist.seed_everything(args.seed)
    resnet = build_classifier(args.backbone, K, norm="bn").to(env.device)
    model = cdist.wrap_ddp(JigsawModel(resnet, args.strategy, dataset.template, K), env)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    # Sec. 4.1: warm-up from 0.2 to 0.8 (x batch / 512) over 1250 iterations, then cosine to 0.
    scheduler = engine.build_scheduler(optimizer, args.iters, args.warmup_iters, args.warmup_lr / args.lr, "cosine")
    resume = engine.resolve_resume(args.resume, out, run_dir=args.out if args.demo else None)  # demo: all stages
    erf = None
    if args.strategy == "erf":
        erf = ErfWeights(resnet, dataset, args.tau, args.erf_every, args.iters, args.erf_images, args.seed, env.device)
        if resume is None:
            erf.refresh()  # step 0; a resumed run takes its weights from the checkpoint

    def loss_fn(model, images, targets):
        labels = torch.stack([t["region_labels"] for t in targets])  # (B, 4)
        return {f"loss_{args.strategy}": model(torch.stack(images), labels, erf.weights if erf else None)}

    meter = ComputeMeter(env.device)  # Tab. 5's cost of the pre-training, ERF refreshes included
    meter.start()
    steps = min(args.iters, max_steps or args.iters)
    engine.train_detector(model, loader, optimizer, scheduler, epochs=math.ceil(args.iters / len(loader)),
                          max_steps=steps, out_dir=out, args=args, loss_fn=loss_fn, amp=args.amp,
                          checkpoint_every=args.checkpoint_every, resume=resume,
                          extra_state={"compute": meter, **({"erf": erf} if erf else {})}, log_every=args.log_every,
                          desc=f"pretrain {args.strategy}", on_step_end=erf.on_step_end if erf else None)
    meter.write(out, iterations=steps)
    cdist.barrier()
    return out / "checkpoint.pth"


# ---------------------------------------------------------------------------------------------
# Fine-tuning on the same detection dataset (Sec. 4.1, Tables 3 and 5)
# ---------------------------------------------------------------------------------------------
def detection_data(args, env):
    """Training loader (per-rank batch) and evaluation loader of the detection dataset."""
    kw = dict(num_images=args.num_images, image_size=args.image_size, seed=args.seed)
    train_set = cdata.build_detection_dataset(
        args.data, args.train_split, cdata.detection_transforms(True, (args.min_size,), args.max_size), **kw,
        train=True, masks=args.arch == "mask_rcnn")
    val_set = cdata.build_detection_dataset(args.data, args.val_split, cdata.detection_transforms(False), **kw)
    # --det-batch-size is the global detection batch (16 in Sec. 4.1); each rank takes batch / world.
    train_loader = cdata.build_loader(train_set, args.det_batch_size // env.world_size, train=True,
                                      workers=args.workers, seed=args.seed, persistent_workers=True)
    val_loader = cdata.build_loader(val_set, max(1, args.det_batch_size // env.world_size), train=False,
                                    workers=args.workers)
    return train_set, train_loader, val_loader


def make_detector(args, num_classes: int, scratch: bool, weights=None):
    """Jigsaw fine-tuning: frozen BN, stem and res2 frozen (torchvision's default). Scratch (Tab. 5,
    following He et al. 2019): GroupNorm, every layer trained, random initialisation."""
    try:
        kwargs = dict(json.loads(args.det_kwargs))
    except (ValueError, TypeError) as e:
        raise ValueError(f"--det-kwargs must be a JSON object such as '{{\"anchor_sizes\": [16, 32, 64, 128, 256]}}', "
                         f"got {args.det_kwargs!r} ({e})") from e
    return build_detector(args.arch, num_classes, args.backbone, norm="gn" if scratch else "frozen_bn",
                          trainable_layers=5 if scratch else 3, min_size=args.min_size, max_size=args.max_size,
                          pretrained=None if scratch else weights, **kwargs)


def compute_seconds(device: torch.device) -> float:
    """The clock of the equal-compute comparison (Tab. 5): this process's CPU time on the CPU (other
    jobs on a shared machine do not count), wall-clock after a synchronize on CUDA (GPU time)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class ComputeMeter:
    """Tab. 5's cost of a training stage, recorded as it runs: `compute_seconds` of each rank's
    training loop (ERF refreshes included), kept in the checkpoint for every rank (so --resume
    carries it on) and written to OUT/<stage>/compute.json at the end. `total` is the sum over
    ranks: GPU-seconds (the paper's GPU days), or CPU-seconds on the CPU."""

    def __init__(self, device: torch.device):
        self.device, self.carried, self.t0 = device, 0.0, None

    def start(self) -> None:
        self.t0 = compute_seconds(self.device)

    def seconds(self) -> float:
        """This rank's compute so far (the run it resumed included)."""
        return self.carried + (compute_seconds(self.device) - self.t0 if self.t0 is not None else 0.0)

    def state_dict(self) -> dict:  # called on every rank (the checkpoint is a collective)
        return {"per_rank_s": cdist.all_gather_object(self.seconds())}

    def load_state_dict(self, state: dict) -> None:
        per_rank = state["per_rank_s"]
        self.carried = float(per_rank[cdist.get_rank() % len(per_rank)])

    def write(self, out_dir, **extra) -> dict:
        """Every rank's compute and their sum into out_dir/compute.json (a collective); returns it."""
        per_rank = cdist.all_gather_object(self.seconds())
        record = {"per_rank_s": per_rank, "total_s": float(sum(per_rank)), "world_size": len(per_rank),
                  "clock": "cuda wall-clock" if self.device.type == "cuda" else "process CPU time", **extra}
        if cdist.is_main():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            cdata.write_json_atomic(record, Path(out_dir) / "compute.json")
        return record


def read_compute(stage_dir) -> float:
    """The total compute (seconds summed over ranks) a finished stage recorded in compute.json."""
    path = Path(stage_dir) / "compute.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the equal-compute budget of --stage scratch is the Jigsaw run's "
                                f"pre-training + fine-tuning compute, which those stages write when they finish; run "
                                f"them first into this --out, or pass --scratch-budget-s SECONDS")
    return float(json.loads(path.read_text())["total_s"])


def finetune_dir(args, scratch: bool = False) -> Path:
    return Path(args.out) / ("scratch" if scratch else
                             ("finetune" if args.strategy == "erf" else f"finetune_{args.strategy}"))


def scratch_budget(args) -> float:
    """Tab. 5: the compute the from-scratch detector gets (seconds over all ranks): --scratch-budget-s,
    or ('auto') what the Jigsaw run's pre-training and fine-tuning recorded."""
    if args.scratch_budget_s != "auto":
        try:
            return float(args.scratch_budget_s)
        except ValueError:
            raise ValueError(f"--scratch-budget-s must be 'auto' or a number of seconds, got "
                             f"{args.scratch_budget_s!r}") from None
    return read_compute(pretrain_dir(args)) + read_compute(finetune_dir(args))


def seconds_per_iteration(model, loader, env, amp: bool, iters: int) -> float:
    """Compute of one training iteration of `model` as it will train (DDP-wrapped, so the gradient
    all-reduce counts), summed over ranks: the median of `iters` steps after a warm-up step. The
    optimizer has LR 0 and the model no running statistics (GroupNorm), so the weights stay as built."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    times = []
    cdata.set_epoch(loader, 0)
    while len(times) < iters:
        for images, targets in loader:
            t0 = compute_seconds(env.device)
            with engine.autocast(env.device, amp):  # the precision the training will run at
                losses = model([im.to(env.device) for im in images], engine._to_device(targets, env.device))
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()
            times.append(compute_seconds(env.device) - t0)
            if len(times) > iters:
                break
    return float(sum(cdist.all_gather_object(float(np.median(times[1:])))))


def detector_schedule(args, iters_per_epoch: int) -> dict:
    """The 1x schedule (Sec. 4.1): --det-epochs, LR x0.1 at --det-steps epochs, in iterations."""
    return {"iterations": args.det_epochs * iters_per_epoch,
            "milestones": [s * iters_per_epoch for s in args.det_steps]}


def scratch_schedule(args, env, model, loader) -> dict:
    """Tab. 5: the from-scratch run's iterations = its budget / its measured compute per iteration,
    the 1x schedule's LR steps (9/13, 12/13) at the same fractions. Written to OUT/scratch/schedule.json
    by the first run; a resumed run reads it back (its calibration must not change)."""
    path = finetune_dir(args, scratch=True) / "schedule.json"
    if args.resume and path.is_file():
        return json.loads(path.read_text())
    budget = scratch_budget(args)
    if budget <= 0:
        return detector_schedule(args, len(loader))
    sec = seconds_per_iteration(model, loader, env, args.amp, args.calibrate_iters)
    cdist.seed_everything(args.seed)  # training starts from the same RNG state as without calibration
    n = max(1, round(budget / sec))
    schedule = {"budget_s": budget, "seconds_per_iteration": sec, "iterations": n,
                "milestones": [round(n * s / args.det_epochs) for s in args.det_steps]}
    if cdist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        cdata.write_json_atomic(schedule, path)
    print(f"[scratch] {sec:.3f}s per iteration (all ranks): {n} iterations fit the budget of {budget:.0f}s")
    return schedule


def finetune(args, env, scratch: bool = False) -> dict:
    """Fine-tune a detector from the Jigsaw checkpoint (or from scratch with GroupNorm at the
    equal-compute budget), evaluate on --val-split; returns the metrics with the training's compute."""
    out = finetune_dir(args, scratch)
    name = out.name
    weights = None if scratch else (args.weights or str(pretrain_dir(args) / "checkpoint.pth"))
    train_set, loader, val_loader = detection_data(args, env)
    C = len(train_set.classes)
    if args.arch == "mask_rcnn" and "masks" not in train_set[0][1]:
        raise ValueError(f"--arch mask_rcnn needs instance masks, and {args.data} yields none; "
                         f"use faster_rcnn_c4 / faster_rcnn_fpn")
    resume = engine.resolve_resume(args.resume, out, run_dir=args.out if args.demo else None)
    cdist.seed_everything(args.seed)
    model = cdist.wrap_ddp(make_detector(args, C, scratch, weights).to(env.device), env)
    schedule = scratch_schedule(args, env, model, loader) if scratch else detector_schedule(args, len(loader))
    n = schedule["iterations"]
    lr = args.det_lr * args.det_batch_size / 16  # Sec. 4.1: 0.02 at batch 16, scaled linearly
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = engine.build_scheduler(optimizer, n, min(args.det_warmup_iters, n // 4), 0.001, "step",
                                       schedule["milestones"])
    meter = ComputeMeter(env.device)
    meter.start()
    engine.train_detector(model, loader, optimizer, scheduler, epochs=math.ceil(n / len(loader)), max_steps=n,
                          out_dir=out, args=args, amp=args.amp, checkpoint_every=args.checkpoint_every,
                          resume=resume, extra_state={"compute": meter}, log_every=args.log_every, desc=name)
    compute = meter.write(out, iterations=n)
    metrics = evaluate_detector(cdist.unwrap(model), val_loader, env.device, metric=evaluation_metric(args.data))
    metrics.update(train_compute_s=compute["total_s"], iterations=n, budget_s=schedule.get("budget_s"))
    if cdist.is_main():
        cdata.write_json_atomic(metrics, out / "metrics.json")
        budget = f", budget {schedule['budget_s']:.0f}s" if schedule.get("budget_s") else ""
        print(f"[{name}] AP {metrics['AP']:.4f} AP50 {metrics['AP50']:.4f} AP75 {metrics['AP75']:.4f} "
              f"({n} iterations, {compute['total_s']:.0f}s of compute{budget})")
    return metrics


# ---------------------------------------------------------------------------------------------
# Evaluation of the pre-training: Fig. 6 (ERF of the top-left region) and the pipeline benchmark
# ---------------------------------------------------------------------------------------------
def erf_figure(args, env, checkpoints: dict, path) -> dict:
    """Fig. 6: for each model (name -> checkpoint path, or None for a random initialisation), the
    summed ERF of the feature positions of region R1 (top-left) over the fixed assembled images.
    Writes the PNG and returns {name: fraction of that ERF's mass outside R1}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.detectors import is_torchvision, load_weights

    dataset = build_pretrain_data(args)
    t = dataset.template
    images = fixed_images(dataset, args.erf_images, args.seed).to(env.device)
    fig, axes = plt.subplots(1, len(checkpoints) + 1, figsize=(3.2 * (len(checkpoints) + 1), 3.4))
    shown = (images[0].cpu() * torch.tensor(STD)[:, None, None] + torch.tensor(MEAN)[:, None, None]).clamp(0, 1)
    axes[0].imshow(shown.permute(1, 2, 0).numpy())
    axes[0].set_title("assembled input")
    outside = {}
    for ax, (name, ckpt) in zip(axes[1:], checkpoints.items()):
        resnet = build_classifier(args.backbone, len(dataset.classes), norm="bn")
        if is_torchvision(ckpt):  # ImageNet=torchvision (Fig. 6 (d)): torchvision's ImageNet weights
            resnet = build_classifier(args.backbone, len(dataset.classes), norm="bn", pretrained=str(ckpt))
        elif ckpt is not None:
            load_weights(resnet, ckpt, verbose=False)
        erf = effective_receptive_fields(resnet.to(env.device), images)  # (P, H, W)
        r1 = erf[t.region_of_position() == 0].sum(0)  # the top-left region's positions
        outside[name] = float(1 - (r1 * t.input_masks()[0]).sum() / r1.sum().clamp_min(1e-12))
        ax.imshow((r1 / r1.max().clamp_min(1e-12)).numpy(), cmap="magma")
        ax.set_title(f"{name}\n{100 * outside[name]:.0f}% of the ERF outside R1")
    for ax in axes:
        ax.axhline(t.split - 0.5, color="c", lw=1)
        ax.axvline(t.split - 0.5, color="c", lw=1)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("ERF of the top-left region's features (Fig. 6)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return outside


def benchmark(args, env, batches: int = 10) -> dict:
    """Assembled images/s from the data pipeline (--workers processes) next to the model's training
    step on the same batches: the pipeline must keep up."""
    dataset = build_pretrain_data(args)
    K = len(dataset.classes)
    per_rank = args.batch_size // env.world_size
    loader = cdata.build_loader(dataset, per_rank, train=True, workers=args.workers, seed=args.seed,
                                group_by_aspect_ratio=False)
    cdata.set_epoch(loader, 0)
    t0 = time.perf_counter()  # from the start of the workers: prefetched batches cannot flatter the rate
    for _, batch in zip(range(batches), loader):
        pass
    data_rate = batches * per_rank / (time.perf_counter() - t0)
    model = JigsawModel(build_classifier(args.backbone, K, norm="bn"), args.strategy, dataset.template, K).to(env.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    t = dataset.template
    P = len(t.region_of_position())
    weights = erf_label_weights(torch.ones(P, t.size, t.size), t.input_masks(), t.region_of_position(), args.tau)
    images = torch.stack(batch[0]).to(env.device)
    labels = torch.stack([x["region_labels"] for x in batch[1]]).to(env.device)
    times = []
    for k in range(batches + 1):
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with engine.autocast(env.device, args.amp):
            loss = model(images, labels, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        if k:
            times.append(time.perf_counter() - t0)
    model_rate = per_rank / float(np.median(times))
    result = {"workers": args.workers, "batch": per_rank, "pipeline_images_per_s": data_rate,
              "model_images_per_s": model_rate, "pipeline_keeps_up": data_rate >= model_rate}
    print(f"| workers | batch | pipeline img/s | model step img/s | pipeline keeps up |\n|---|---|---|---|---|\n"
          f"| {args.workers} | {per_rank} | {data_rate:.1f} | {model_rate:.1f} | {result['pipeline_keeps_up']} |")
    return result


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
DEMO = dict(  # the CPU demo (DEVIATION, see the header); the recipe is common.demo's
    train_scenes=400, val_scenes=300, input_size=192, split=64, scale_range=(1.6, 3.0), pretrain_batch=8,
    pretrain_steps=200, erf_images=1, finetune_steps=120, calibrate_steps=(8, 16))
DEMO_STRATEGIES = {"erf": "ERF-adaptive Dense Cls.", "blockwise": "Block-wise Cls.", "global": "Global Cls."}


def demo_pretrain(resnet, assembly: JigsawAssembly, strategy: str, steps: int, batch: int, seed: int,
                  tau: float = 0.7, erf_images: int = 1) -> float:
    """Jigsaw pre-training at the demo recipe (common.demo's classifier optimiser and one-cycle LR;
    Eq. 2's weights refreshed at step 0 and half-way); returns its compute (`compute_seconds`)."""
    from common.demo import demo_optimizer, one_cycle

    device = next(resnet.parameters()).device
    t = assembly.template
    model = JigsawModel(resnet, strategy, t, len(assembly.classes))
    optimizer = demo_optimizer(model.parameters(), "classifier")
    scheduler = one_cycle(optimizer, steps, max(1, steps // 4))
    t0 = compute_seconds(device)
    erf = None
    if strategy == "erf":
        erf = ErfWeights(resnet, assembly, tau, max(1, steps // 2), steps, erf_images, seed, device)
        erf.refresh()
    torch.manual_seed(seed)
    model.train()
    for step in range(1, steps + 1):
        items = [assembly[i] for i in range(batch)]  # each item draws its four samples at random
        images = torch.stack([x for x, _ in items]).to(device)
        labels = torch.stack([y["region_labels"] for _, y in items]).to(device)
        loss = model(images, labels, erf.weights if erf else None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if erf:
            erf.on_step_end(step)
        if step % 10 == 0 or step == steps:
            print(f"pretrain {strategy} step {step}/{steps} loss {loss.item():.3f}")
    return compute_seconds(device) - t0


def demo_finetune(model, train_set, steps: int, seed: int) -> float:
    """common.demo's detector training; returns its compute (`compute_seconds`)."""
    from common.demo import train_demo_detector

    device = next(model.parameters()).device
    t0 = compute_seconds(device)
    train_demo_detector(model, train_set, steps, seed=seed)
    return compute_seconds(device) - t0


def demo_seconds_per_step(train_set, num_classes: int, seed: int, steps=(8, 16)) -> float:
    """The scratch detector's compute per step: the difference of two short runs of a throwaway
    copy, over their difference in steps (start-up costs cancel)."""
    from common.demo import build_demo_detector

    cost = []
    for n in steps:
        torch.manual_seed(seed)
        cost.append(demo_finetune(build_demo_detector(num_classes, norm="gn"), train_set, n, seed))
    return max(1e-6, (cost[1] - cost[0]) / (steps[1] - steps[0]))


def demo(args, env) -> dict:
    """Tab. 5 and Tab. 2 on the benchmark's synthetic scenes at common.demo's recipe; writes
    OUT/demo.json. Costs are `compute_seconds` (this process's CPU time on the CPU)."""
    from common.demo import (build_demo_detector, claim, evaluate_demo_detector, train_demo_detector_on_budget,
                             write_demo_result)
    from common.synthetic import SyntheticDetection

    wall0 = time.time()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: the demo writes a fresh folder; pass another --out")
    d, s = DEMO, args.seed
    train_set = SyntheticDetection(d["train_scenes"], 64, seed=1000 * s + 1, cache=out / "cache")
    val_set = SyntheticDetection(d["val_scenes"], 64, seed=1000 * s + 2, cache=out / "cache")
    C = len(train_set.classes)
    extract_samples(train_set, out / "samples", s)  # Sec. 3.1
    table = load_sample_table(out / "samples")
    assembly = JigsawAssembly(train_set, table, Template(d["input_size"], d["split"]), "padcrop", d["scale_range"])
    rows, cost = {}, {}
    strategies = ["erf"] + [k for k in DEMO_STRATEGIES if k != "erf" and k in args.demo_strategies]
    for strategy in strategies:  # Tab. 2: the same pre-training and fine-tuning, three losses
        torch.manual_seed(s)
        resnet = build_classifier("resnet18", len(assembly.classes), norm="bn")
        pre = demo_pretrain(resnet, assembly, strategy, d["pretrain_steps"], d["pretrain_batch"], s,
                            args.tau, d["erf_images"])
        torch.manual_seed(s)
        detector = build_demo_detector(C, pretrained=resnet.state_dict())
        ft = demo_finetune(detector, train_set, d["finetune_steps"], s)
        rows[strategy] = evaluate_demo_detector(detector, val_set)
        cost[strategy] = {"pretrain_s": pre, "finetune_s": ft, "total_s": pre + ft}
    # Tab. 5: the GroupNorm detector from scratch trains until its own compute reaches the ERF-adaptive
    # run's pre-training + fine-tuning compute; the calibrated cost per step only plans its warm-up
    budget = cost["erf"]["total_s"]
    per_step = demo_seconds_per_step(train_set, C, s, d["calibrate_steps"])
    planned = max(8, round(budget / per_step))  # (one-cycle needs 8; never binds at the demo's size)
    torch.manual_seed(s)
    scratch = build_demo_detector(C, norm="gn")
    device = next(scratch.parameters()).device
    t0 = compute_seconds(device)
    steps = train_demo_detector_on_budget(scratch, train_set, budget, planned, seed=s,
                                          clock=lambda: compute_seconds(device))
    used = compute_seconds(device) - t0
    rows["scratch"] = evaluate_demo_detector(scratch, val_set)
    cost["scratch"] = {"budget_s": budget, "seconds_per_step": per_step, "planned_steps": planned, "steps": steps,
                       "total_s": used}

    fmt = lambda m: f"{m['AP']:.3f} | {m['AP50']:.3f} | {m['AP75']:.3f}"
    groups = {g: int(len(v)) for g, v in assembly.groups.items()}
    print(f"\nSample table (Sec. 3.1): {table['meta']['positives']} positives, {table['meta']['negatives']} negatives "
          f"from {d['train_scenes']} scenes; aspect groups {groups}")
    print(f"\nTable 5: equal total compute (CPU seconds of this process); COCO AP on {d['val_scenes']} held-out scenes")
    print("| method | compute (s) | AP | AP50 | AP75 |\n|---|---|---|---|---|")
    print(f"| Scratch (GN), {steps} steps ({planned} planned; budget {budget:.0f} s) | {used:.0f} | {fmt(rows['scratch'])} |")
    print(f"| Jigsaw ({d['pretrain_steps']} steps) + {d['finetune_steps']} steps | {budget:.0f} | {fmt(rows['erf'])} |")
    print("\nTable 2: classification strategy (same pre-training and fine-tuning)")
    print("| strategy | compute (s) | AP | AP50 | AP75 |\n|---|---|---|---|---|")
    for k in strategies:
        print(f"| {DEMO_STRATEGIES[k]} | {cost[k]['total_s']:.0f} | {fmt(rows[k])} |")
    wall = time.time() - wall0
    tables = {"table5": {"scratch_gn": {**rows["scratch"], **cost["scratch"]},
                         "jigsaw_erf": {**rows["erf"], **cost["erf"]}},
              "table2": {DEMO_STRATEGIES[k]: {**rows[k], **cost[k]} for k in strategies},
              "samples": {**{k: v for k, v in table["meta"].items() if k != "classes"}, "aspect_groups": groups},
              "settings": {**DEMO, "detector": "faster_rcnn_fpn (common.demo.build_demo_detector)"}}
    claims = [claim("Jigsaw + fine-tune > scratch (GN) at equal compute", "AP50",
                    ("Jigsaw (ERF-adaptive) + fine-tune", rows["erf"]["AP50"]), ("scratch (GN)", rows["scratch"]["AP50"]))]
    write_demo_result(out, "jigsaw.py", s, wall, claims, tables)
    print(f"\ndemo wall-clock: {wall:.0f}s")
    return {"rows": rows, "cost": cost}


def main(args):
    env = cdist.init_distributed(args.device)
    try:
        if args.demo:
            return demo(args, env)
        if args.stage == "extract":
            return build_pretrain_data(args)
        if args.stage == "pretrain":
            return pretrain(args, env)
        if args.stage in ("finetune", "scratch"):
            return finetune(args, env, scratch=args.stage == "scratch")
        if args.stage == "benchmark":
            return benchmark(args, env)
        pairs = dict(c.split("=", 1) for c in args.checkpoints) if args.checkpoints else {
            "ERF-adaptive": str(pretrain_dir(args) / "checkpoint.pth")}
        pairs = {name: None if path.lower() == "random" else path for name, path in pairs.items()}
        outside = erf_figure(args, env, pairs, Path(args.out) / "erf_fig6.png")
        print(json.dumps(outside, indent=1))
        return outside
    finally:
        cdist.cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
