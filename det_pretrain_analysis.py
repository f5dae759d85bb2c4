"""An Analysis of Pre-Training on Object Detection.

Li, Singh, Najibi, Wu, Davis, 2019 (https://arxiv.org/abs/1904.05871); thesis Chapter 4.

Takes two or more pre-trained networks (a classifier, a detector of this project or torchvision,
the output of dap.py / jigsaw.py / soco.py), reduces each to one ResNet backbone through
`common.detectors.load_weights`, and runs the paper's experiments on all of them alike, writing a
report folder (report.json, report.md, PNG figures) that sets the networks side by side:

    experiment        paper                     function(s)
    detection         Sec. 2.1, Fig. 1, Tab. 1  finetune_detection, ap_vs_iou
    classification    Tab. 8                    finetune_classification
    probes            Tab. 6                    conv5_features, linear_probe
    head-probes       Tab. 5                    detection_head_features, linear_probe
    features          App. 6.1, Fig. 6, 7, 3    kmeans_labels, comembership, closest_pairs,
                                                close_but_distant_pairs, t-SNE (scikit-learn)
    visualisation     App. 6.1, Fig. 4, 5       activation_maps, mask_out_map
    removal           Sec. 2.1, Tab. 2, 7       removal_categories, without_categories,
                                                pretrain_detector, pretrain_classifier

The quantities, tied to the functions (all pure, tensors / arrays in and out):
    P(same cluster in B | same cluster in A) over unordered pairs     comembership
        = sum_ij C(n_ij, 2) / sum_i C(a_i, 2) with the contingency table n_ij of the two clusterings
    correct-class probability with a 60x60 blank patch centred at each position   mask_out_map
    AP at IoU 0.1, 0.2 ... 0.9 (VOC AP, the paper's PASCAL numbers)                ap_vs_iou
    Conv5 activation map: channel mean of res5's output                           activation_maps

CHOICE (the paper is silent):
- Every network enters the experiments as its ResNet backbone only (plain ResNet tensor names):
  detection fine-tuning re-initialises everything after Conv5 (FPN, RPN, box head), the
  classification experiments put a new linear layer on average-pooled Conv5. The detection-head
  features of Tab. 5 are read from the full detector of a `det` network.
- Tab. 5 on torchvision's FPN detector: the image is one RoI (the whole image). Conv5 = res5 of
  the backbone, average pooled; ConvProj = the FPN feature map (256 channels, FPN's 1x1 projection
  + 3x3) RoI-aligned to 14x14 on the level the RoI maps to, and average pooled to 4x4 / 2x2 / 1x1;
  FC1 / FC2 = the box head's fc6 / fc7 (after ReLU) on the 7x7 RoI feature the detector uses.
- Linear probes: multinomial logistic regression (scikit-learn, L-BFGS) on standardised features,
  `--probe-c` the inverse L2 strength; the paper says "a linear classifier followed by softmax".
- Classification fine-tuning (Tab. 8): SGD momentum 0.9, weight decay 1e-4, cosine LR, ImageNet
  augmentation (random resized crop + flip); `--cls-epochs` / `--cls-lr` are ours.
- Detection fine-tuning: Faster R-CNN FPN (torchvision) with frozen BN; LR 0.02 at a global batch
  of 16, 100 warm-up iterations, weight decay 1e-4 (Detectron's defaults).
- K-means (scikit-learn KMeans, k-means++, one init per k; MiniBatchKMeans above 20,000 images)
  on L2-normalised Conv5 features, k on a log grid from 2 to min(1000, n/2) plus k = 4. A pair is
  "close" in A when it shares a cluster at the largest k, "distant" in B when it does not share
  one at k = 4 (the paper: > 1000 and < 5 clusters). Closest pairs: cosine distance.
- Mask-out: the blank patch is zero on the normalised input (the mean colour), as Zeiler and
  Fergus's grey square; positions are patch centres on a grid of `--mask-stride` pixels (1 = every
  pixel, as in Fig. 5), the patch clipped at the border. The classifier on top is the Tab. 6 probe.
  The figure shows test images that every network's probe classifies correctly, first.
- Tab. 2 / Tab. 7, controlled as the paper: from one init (`--pretrain-init`), on the same
  pre-training images, for the same iterations, a classifier on the images' labels (the class of
  an image's largest box; "IMAGENET-LOC (Cls)"), a detector on every image and a detector on the
  images holding no removed category (removing an ImageNet-LOC class removes its images); all
  three fine-tuned like every network. VOC AP at IoU 0.7 on the removed categories, their mean
  for a group. Names match across datasets by the COCO <-> VOC correspondence; "vehicle" /
  "animal" name COCO's supercategories. The default budget, 1 epoch over the full pre-training
  set (`--pretrain-epochs`, also the w/o set's iterations), and the detector's LR steps x0.1 at
  2/3 and 8/9 of it are ours (the classifier: cosine, as Tab. 8's fine-tuning).
- VOC AP (Fig. 1, Tab. 1, 2, 7): the devkit's (difficult objects ignored), with SNIPER's rule: the
  11-point metric for a VOC test root of a year before 2010 (`VOC2007`), the area metric otherwise.
- Training and Conv5 extraction shard over ranks and gather in dataset order. The analyses
  (probes, k-means, t-SNE, mask-out: minutes to hours at full scale) run after the process group
  is gone, each rank its share of the units (`rank_share`), results passed through files under
  --out (`Exchange`), so no rank waits in a collective past NCCL's 10-minute watchdog. A probe is
  fitted once, on one rank, in float32 (ConvProj (256,14,14) on 15k images: about 6 GB).

DEVIATION (we differ from the paper):
- SNIPER with multi-scale chips is not reimplemented: training uses torchvision's Faster R-CNN FPN
  on random shortest sides `--det-scales`, and the test is single scale.
- The RPN warm-up epochs of the thesis (negative chip mining) are not run: there are no chips.
- Not implemented: semantic segmentation (Tab. 4, Fig. 2, 9), the occlusion error analysis of
  Tab. 3 (Hoiem's tool, occlusion annotations), the qualitative detections of Fig. 8.
- Demo: the synthetic benchmark at the shared CPU recipe (`common.demo`: AdamW, trainable BN,
  64-px images) instead of the full-scale SGD settings; the cls network is the demo classifier,
  the det network it + detection pre-training on scenes (the paper's detectors start from
  IMAGENET-CLS); both fine-tuned on other scenes. It measures Fig. 1 and Tab. 6 (and Fig. 6's
  co-membership); Tab. 2, 5, 8 and the figures are beyond its budget.

Full-scale commands (ResNet-101 as the paper; VOC07+12 trainval / VOC07 test; ImageFolder
classification sets as {root}/train/<class>/ and {root}/test/<class>/):
    torchrun --nproc_per_node 8 det_pretrain_analysis.py --backbone resnet101 \\
        --net in_cls=torchvision:cls --net coco_det=runs/coco_r101/checkpoint.pth:det \\
        --net dap=runs/dap/det/checkpoint.pth --net soco=runs/soco/checkpoint.pth \\
        --det-data VOCdevkit/VOC2007,VOCdevkit/VOC2012 --det-train-split trainval \\
        --det-test-data VOCdevkit/VOC2007 --det-test-split test \\
        --cls-data /data/caltech256 --out runs/det_pretrain_analysis
    # Tab. 2: add --experiments removal --pretrain-data /data/coco --pretrain-split train2017 \\
    #         --remove-categories vehicle --pretrain-init in_cls   (or: car bus truck)
CPU demo (the paper's comparison on the synthetic benchmark, writes OUT/demo.json; ~6 min on 2 cores):
    python det_pretrain_analysis.py --demo --seed 0 --out runs/det_pretrain_analysis_demo
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from common.data import (DetectionSubset, write_json_atomic, build_classification_dataset,
                         build_detection_dataset, build_loader, classification_transforms,
                         detection_transforms)
from common.synthetic import SyntheticDetection
from common.detectors import (read_state_dict, backbone_state_dict, build_classifier, build_detector,
                              is_torchvision, load_weights)
from common.distributed import (all_gather_object, barrier, cleanup, init_distributed, is_main,
                                seed_everything, wrap_ddp)
from common.engine import build_scheduler, resolve_resume, train_detector
from common.evaluation import evaluation_metric, predict, voc_evaluate

EXPERIMENTS = ("detection", "classification", "probes", "head-probes", "features", "visualisation", "removal")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet normalisation (torchvision's)


# ============================================================================================
# Arguments: the paper's settings, then system settings
# ============================================================================================
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("det_pretrain_analysis", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    h = p.add_argument_group("paper")
    h.add_argument("--iou-thresholds", type=float, nargs="+", default=[round(0.1 * i, 1) for i in range(1, 10)],
                   help="IoUs of the AP curve, Fig. 1 (0.1 ... 0.9)")
    h.add_argument("--det-epochs", type=int, default=7, help="detection fine-tuning epochs, Sec. 2.1")
    h.add_argument("--det-lr-steps", type=int, nargs="*", default=[5], help="LR x0.1 after these epochs, Sec. 2.1")
    h.add_argument("--det-batch-size", type=int, default=16, help="global batch (CHOICE)")
    h.add_argument("--det-lr", type=float, default=0.02, help="LR at --det-batch-size (CHOICE, Detectron)")
    h.add_argument("--det-warmup", type=int, default=100, help="warm-up iterations (CHOICE)")
    h.add_argument("--clip-grad", type=float, default=0.0, help="gradient-norm clipping of every training (0: off)")
    h.add_argument("--det-scales", type=int, nargs="+", default=[800], help="training shortest sides (DEVIATION)")
    h.add_argument("--det-max-size", type=int, default=1333)
    h.add_argument("--det-test-size", type=int, default=800)
    h.add_argument("--hflip", type=float, default=0.5, help="horizontal flip, Sec. 2.1")
    h.add_argument("--anchor-sizes", type=int, nargs="*", default=None, help="default: torchvision's 32..512")
    h.add_argument("--box-batch-per-image", type=int, default=512, help="RoIs sampled per image (torchvision)")
    h.add_argument("--test-proposals", type=int, default=1000, help="RPN proposals per test image (torchvision)")
    h.add_argument("--cls-epochs", type=int, default=30, help="classification fine-tuning epochs (CHOICE)")
    h.add_argument("--cls-batch-size", type=int, default=64, help="global batch (CHOICE)")
    h.add_argument("--cls-lr", type=float, default=0.01, help="LR at --cls-batch-size, cosine (CHOICE)")
    h.add_argument("--cls-size", type=int, default=224, help="classification input side")
    h.add_argument("--probe-c", type=float, default=1.0, help="inverse L2 strength of the linear probes (CHOICE)")
    h.add_argument("--kmeans-max", type=int, default=1000, help="largest cluster count, App. 6.1 (2 ... 1000)")
    h.add_argument("--kmeans-points", type=int, default=12, help="cluster counts on the log grid")
    h.add_argument("--pairs", type=int, default=4, help="image pairs per column of the Fig. 3 figure")
    h.add_argument("--mask-patch", type=int, default=60, help="blank patch side, App. 6.1 (60x60)")
    h.add_argument("--mask-stride", type=int, default=1, help="pixels between patch centres (1: Fig. 5)")
    h.add_argument("--vis-images", type=int, default=4, help="images in the Fig. 4 / Fig. 5 figures")
    h.add_argument("--remove-categories", nargs="*", default=[],
                   help="categories left out, Tab. 2: names (COCO or VOC spelling) or a group (vehicle, animal)")
    h.add_argument("--pretrain-epochs", type=float, default=1,
                   help="Tab. 2 / 7 pre-training epochs over the full pre-training set (CHOICE)")
    h.add_argument("--pretrain-steps", type=int, default=0, help="or a fixed number of iterations")
    h.add_argument("--pretrain-batch-size", type=int, default=16, help="global batch")
    h.add_argument("--pretrain-lr", type=float, default=0.02)
    h.add_argument("--pretrain-norm", default="frozen_bn", help="frozen_bn (from a classifier) or bn (scratch)")
    h.add_argument("--pretrain-trainable-layers", type=int, default=3)
    h.add_argument("--pretrain-init", default="", help="name of the --net whose backbone starts pre-training")

    g = p.add_argument_group("system")
    g.add_argument("--net", action="append", default=[], metavar="NAME=PATH[:KIND]",
                   help="a pre-trained network (repeat, two or more): PATH a checkpoint, 'torchvision' "
                        "(IMAGENET1K_V1) or 'torchvision:IMAGENET1K_V2', "
                        "KIND cls, det or auto (from its keys)")
    g.add_argument("--backbone", default="resnet101", help="ResNet of every network (paper: ResNet-101)")
    g.add_argument("--arch", default="faster_rcnn_fpn", choices=("faster_rcnn_fpn", "faster_rcnn_c4"))
    g.add_argument("--experiments", nargs="+", default=["all"], choices=("all",) + EXPERIMENTS)
    g.add_argument("--det-data", default="synthetic", help="'synthetic', a COCO root, VOC root(s) joined by ','")
    g.add_argument("--det-train-split", default="trainval")
    g.add_argument("--det-test-data", default="", help="default: --det-data")
    g.add_argument("--det-test-split", default="test")
    g.add_argument("--cls-data", default="synthetic",
                   help="'synthetic' or an ImageFolder root ({root}/{split}/<class>/)")
    g.add_argument("--cls-train-split", default="train")
    g.add_argument("--cls-test-split", default="test")
    g.add_argument("--pretrain-data", default="synthetic", help="Tab. 2 pre-training set (detection format)")
    g.add_argument("--pretrain-split", default="pretrain")
    g.add_argument("--synthetic-train", type=int, default=512, help="images of a synthetic training split")
    g.add_argument("--synthetic-test", type=int, default=256, help="images of a synthetic test split")
    g.add_argument("--synthetic-pretrain", type=int, default=2048, help="images of the synthetic pre-training split")
    g.add_argument("--synthetic-size", type=int, default=128, help="side of synthetic images")
    g.add_argument("--out", default="runs/det_pretrain_analysis", help="report folder")
    g.add_argument("--workers", type=int, default=4)
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", action="store_true",
                   help="mixed precision for training: float16 on CUDA, bfloat16 on the CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="",
                   help="'auto': continue unfinished trainings from their checkpoint.pth under --out (a fresh "
                        "start where there is none), or the path of one of those checkpoints; finished ones are "
                        "always reused")
    g.add_argument("--demo", action="store_true", help="the paper's comparison on the synthetic benchmark (CPU, "
                                                       "minutes): --seed, --out OUT (writes OUT/demo.json)")
    return p


# ============================================================================================
# Networks: every input reduced to one ResNet backbone (plus the full detector of a `det` net)
# ============================================================================================
@dataclass
class Net:
    name: str
    source: str
    kind: str  # "cls" or "det"
    backbone: dict  # plain ResNet state dict (conv1.*, layer1-4.*), no fc
    detector: dict | None = None  # full state dict of a det net (Tab. 5 head features)

    @property
    def key(self) -> str:
        """Folder name of this network's results: its name and a hash of its weights, so that a
        changed --net under the same name and --out is trained and measured afresh."""
        return f"{_slug(self.name)}-{state_digest(self.detector or self.backbone)}"


def state_digest(state: dict) -> str:
    """12 hex digits of SHA-256 over a state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


_DET_PREFIXES = ("backbone.", "rpn.", "roi_heads.", "head.")


def parse_net(spec: str) -> tuple[str, str, str]:
    """'name=path[:kind]' -> (name, path, kind); kind in cls / det / auto."""
    if "=" not in spec:
        raise ValueError(f"--net {spec!r}: expected NAME=PATH[:KIND], e.g. cls=runs/cls/classifier.pth:cls")
    name, rest = spec.split("=", 1)
    kind = "auto"
    if ":" in rest and rest.rsplit(":", 1)[1] in ("cls", "det", "auto"):
        rest, kind = rest.rsplit(":", 1)
    if not name or not rest:
        raise ValueError(f"--net {spec!r}: empty name or path")
    return name, rest, kind


def load_net(spec: str, backbone: str) -> Net:
    """One network of the comparison: its ResNet backbone through `load_weights`, whatever it came
    from; a detector keeps its full state dict too."""
    name, source, kind = parse_net(spec)
    model = build_classifier(backbone, 1000, pretrained=source if is_torchvision(source) else None)
    raw = None
    if not is_torchvision(source):
        raw = read_state_dict(source)
        report = load_weights(model, raw, verbose=is_main())
        left = [k for k in report.missing + [k for k, _ in report.skipped] if not k.startswith("fc.")]
        if left:
            raise ValueError(f"--net {name}: {len(left)} backbone tensors of a {backbone} found no weights in "
                             f"{source} (first: {left[:3]}); is --backbone right?")
    is_det = raw is not None and any(k.removeprefix("module.").startswith(_DET_PREFIXES) for k in raw)
    kind = ("det" if is_det else "cls") if kind == "auto" else kind
    return Net(name, source, kind, backbone_state_dict(model), raw if is_det and kind == "det" else None)


def backbone_model(net: Net, backbone: str) -> nn.Module:
    """A torchvision ResNet holding `net`'s backbone, in eval mode (its fc unused)."""
    model = build_classifier(backbone, 1000)
    model.load_state_dict(net.backbone, strict=False)
    return model.eval()


def resnet_trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1 ... res5 of a torchvision ResNet: the Conv5 map (B, C, H/32, W/32)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


class ProbedNet(nn.Module):
    """Backbone + average pooling + a linear classifier: the classifier of the mask-out maps, where
    the detection head (or the classification layer) is replaced by a linear layer (App. 6.1)."""

    def __init__(self, resnet: nn.Module, linear: nn.Linear):
        super().__init__()
        self.resnet, self.linear = resnet, linear

    def forward(self, x):
        return self.linear(resnet_trunk(self.resnet, x).mean((2, 3)))


# ============================================================================================
# The measurements (pure functions)
# ============================================================================================
def comembership(labels_a, labels_b) -> tuple[float, float]:
    """Over all unordered pairs of distinct images: P(same cluster in B | same cluster in A) and
    P(same cluster in A | same cluster in B) (Fig. 6). From the contingency table n_ij of the two
    clusterings: pairs together in both = sum_ij C(n_ij, 2), in A = sum_i C(a_i, 2). NaN when no
    pair shares a cluster in the conditioning clustering."""
    a, b = np.asarray(labels_a).ravel(), np.asarray(labels_b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"the two clusterings cover different images: {a.shape} vs {b.shape}")
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    n_ij = np.bincount(a * (b.max() + 1) + b).astype(np.int64)  # (K_a * K_b,) contingency table

    def pairs(counts):
        return float((counts * (counts - 1) // 2).sum())

    both, in_a, in_b = pairs(n_ij), pairs(np.bincount(a)), pairs(np.bincount(b))
    return (both / in_a if in_a else float("nan"), both / in_b if in_b else float("nan"))


@torch.no_grad()
def mask_out_map(model, image: torch.Tensor, target: int, patch: int = 60, stride: int = 1,
                 fill: float = 0.0, batch_size: int = 64) -> torch.Tensor:
    """Correct-class probability with a `patch` x `patch` square of `fill` centred at each position
    (App. 6.1, Fig. 5). `image` (C, H, W) is the model's input; centres lie at 0, stride, 2 stride
    ... in each direction, the patch clipped at the border. Returns (ceil(H / stride), ceil(W / stride)).
    Patch positions are evaluated in batches of `batch_size` masked copies."""
    was_training = model.training
    model.eval()
    _, H, W = image.shape
    ys, xs = torch.arange(0, H, stride), torch.arange(0, W, stride)
    cy, cx = torch.cartesian_prod(ys, xs).unbind(1)  # (P,) centres, row-major
    lo = patch // 2
    rows, cols = torch.arange(H), torch.arange(W)
    probs = []
    for s in range(0, len(cy), batch_size):
        y0, x0 = cy[s:s + batch_size, None] - lo, cx[s:s + batch_size, None] - lo
        in_rows = (rows >= y0) & (rows < y0 + patch)  # (B, H)
        in_cols = (cols >= x0) & (cols < x0 + patch)  # (B, W)
        hole = (in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1).to(image.device)  # (B, 1, H, W)
        masked = torch.where(hole, torch.as_tensor(fill, dtype=image.dtype, device=image.device), image)
        probs.append(model(masked).softmax(1)[:, target].float().cpu())
    model.train(was_training)
    return torch.cat(probs).reshape(len(ys), len(xs))


def ap_vs_iou(predictions, targets, thresholds, use_07_metric: bool = False) -> dict:
    """VOC AP (per class and mean) at each IoU threshold: Fig. 1's curve, Tab. 1's mAP@0.5/0.7."""
    return {float(t): voc_evaluate(predictions, targets, iou_threshold=float(t), use_07_metric=use_07_metric)
            for t in thresholds}


def sniper_07_metric(data: str) -> bool:
    """SNIPER's rule for VOC AP: the 11-point metric for a VOC test root of a year before 2010
    (`use_07_metric = True if int(year) < 2010`), the area metric for later years, other
    layouts and synthetic data. The year is read from the root's name (`VOC2007`)."""
    first = Path(str(data).split(",")[0])
    year = re.fullmatch(r"VOC(\d{4})", first.name)
    return evaluation_metric(str(first)) != "coco" and year is not None and int(year[1]) < 2010


def linear_probe(train_x, train_y, test_x, test_y, c: float = 1.0, seed: int = 0,
                 num_classes: int | None = None) -> tuple[float, nn.Linear]:
    """Softmax (multinomial logistic) regression on standardised features: top-1 accuracy on the
    test set, and the classifier as an `nn.Linear` on the raw features (standardisation folded in)
    with `num_classes` outputs (a class absent from the training set never wins).

    float32 throughout (scikit-learn's L-BFGS keeps it): memory is the features (n x d x 4 bytes)
    plus one standardised copy, e.g. ConvProj (256,14,14) = 50,176 dims on 15,000 training images:
    3.0 GB each, 6 GB in all, on the one rank that fits the probe."""
    from sklearn.linear_model import LogisticRegression

    train_x, test_x = np.asarray(train_x, np.float32), np.asarray(test_x, np.float32)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=1000, random_state=seed)
    clf.fit((train_x - mu) / sd, train_y)
    acc = float((clf.predict((test_x - mu) / sd) == test_y).mean())
    coef, intercept = clf.coef_.astype(np.float64), clf.intercept_.astype(np.float64)
    if len(clf.classes_) == 2:
        # scikit-learn keeps one row, the logit of class 1 against class 0: softmax([-z/2, z/2]) =
        # sigmoid(z) gives the same probabilities with one row per class
        coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    k = num_classes or int(max(train_y.max(), test_y.max())) + 1
    w = np.zeros((k, train_x.shape[1]))
    b = np.full(k, -1e4)
    w[clf.classes_] = coef / sd  # w (x - mu) / sd + b = (w / sd) x + (b - (w / sd) mu)
    b[clf.classes_] = intercept - (coef / sd) @ mu
    linear = nn.Linear(w.shape[1], k)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return acc, linear


def kmeans_labels(features: np.ndarray, ks, seed: int = 0) -> dict:
    """Cluster assignments {k: (n,)} of L2-normalised features for each cluster count k."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    algo = MiniBatchKMeans if len(x) > 20000 else KMeans
    return {int(k): algo(n_clusters=int(k), n_init=1, random_state=seed).fit_predict(x) for k in ks}


def cluster_counts(n: int, k_max: int, points: int) -> list[int]:
    """Log grid from 2 to min(k_max, n // 2), with k = 4 (the 'distant' level) included."""
    top = max(2, min(k_max, n // 2))
    grid = np.unique(np.round(np.geomspace(2, top, max(2, points))).astype(int))
    return sorted(set(grid.tolist()) | ({4} if top >= 4 else set()))


def cosine_distances(f: np.ndarray) -> np.ndarray:
    x = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return 1.0 - x @ x.T


def closest_pairs(dist: np.ndarray, num: int) -> list[tuple[int, int, float]]:
    """The `num` unordered pairs (i < j) with the smallest distance."""
    d = np.where(np.tri(len(dist), dtype=bool), np.inf, dist)  # keep i < j only
    flat = np.argpartition(d.ravel(), min(num, d.size - 1))[:num]
    flat = flat[np.argsort(d.ravel()[flat], kind="stable")]
    return [(int(f // len(d)), int(f % len(d)), float(d.ravel()[f])) for f in flat if np.isfinite(d.ravel()[f])]


def close_but_distant_pairs(dist_a, close_a, far_b, num: int) -> list[tuple[int, int, float]]:
    """Pairs in one cluster of A's finest clustering (`close_a`) but in different clusters of B's
    coarse one (`far_b`), closest in A first (Fig. 3, middle)."""
    i, j = [], []
    for c in np.unique(close_a):
        idx = np.flatnonzero(close_a == c)
        u, v = np.triu_indices(len(idx), 1)
        keep = far_b[idx[u]] != far_b[idx[v]]
        i.append(idx[u][keep])
        j.append(idx[v][keep])
    i, j = np.concatenate(i), np.concatenate(j)
    order = np.argsort(dist_a[i, j], kind="stable")[:num]
    return [(int(i[o]), int(j[o]), float(dist_a[i[o], j[o]])) for o in order]


@torch.no_grad()
def conv5_features(resnet: nn.Module, x: torch.Tensor) -> dict:
    """Average-pooled Conv5 (Tab. 6, Fig. 3, 6, 7)."""
    return {"conv5": resnet_trunk(resnet, x).mean((2, 3))}


@torch.no_grad()
def activation_maps(resnet: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv5 activation map (Fig. 4): mean over channels of res5's output, (B, H/32, W/32)."""
    return resnet_trunk(resnet, x).mean(1)


HEAD_FEATURES = ("Conv5 (avg)", "ConvProj (256,14,14)", "ConvProj (256,4,4)", "ConvProj (256,2,2)",
                 "ConvProj (256)", "FC1 (1024)", "FC2 (1024)")


@torch.no_grad()
def detection_head_features(detector, images: torch.Tensor) -> dict:
    """Tab. 5's features of an FPN Faster R-CNN for whole images (one RoI each). `images` (B, 3, H, W)
    in [0, 1]; the detector normalises them itself."""
    il, _ = detector.transform(list(images))
    body = detector.backbone.body(il.tensors)
    fpn = detector.backbone.fpn(body)
    boxes = [torch.tensor([[0.0, 0.0, w, h]], device=images.device) for h, w in il.image_sizes]
    pool = detector.roi_heads.box_roi_pool
    roi7 = pool(fpn, boxes, il.image_sizes)  # (B, 256, 7, 7): what the box head sees
    roi14 = MultiScaleRoIAlign(pool.featmap_names, 14, 2)(fpn, boxes, il.image_sizes)  # (B, 256, 14, 14)
    head = detector.roi_heads.box_head
    fc1 = F.relu(head.fc6(roi7.flatten(1)))
    out = {"Conv5 (avg)": list(body.values())[-1].mean((2, 3)), "ConvProj (256,14,14)": roi14.flatten(1)}
    for side, name in ((4, "ConvProj (256,4,4)"), (2, "ConvProj (256,2,2)"), (1, "ConvProj (256)")):
        out[name] = F.adaptive_avg_pool2d(roi14, side).flatten(1)  # ConvProj average pooled to side x side
    out["FC1 (1024)"], out["FC2 (1024)"] = fc1, F.relu(head.fc7(fc1))
    return out


def head_detector(net: Net, backbone: str, size: int):
    """The full FPN detector of a `det` net with torchvision's 2-MLP box head (None otherwise)."""
    if net.detector is None or "roi_heads.box_head.fc6.weight" not in net.detector \
            or not any(k.startswith("backbone.fpn.") for k in net.detector):
        return None
    det = build_detector("faster_rcnn_fpn", 1, backbone=backbone, norm="frozen_bn", min_size=size, max_size=size)
    load_weights(det, net.detector, verbose=False)
    return det.eval()


# Tab. 2 across datasets: the standard COCO <-> VOC name correspondence, and the paper's two groups
# ("Vehicle", "Animal") as COCO's supercategories, in COCO's names
VOC_TO_COCO = {"aeroplane": "airplane", "diningtable": "dining table", "motorbike": "motorcycle",
               "pottedplant": "potted plant", "sofa": "couch", "tvmonitor": "tv"}
CATEGORY_GROUPS = {"vehicle": ("airplane", "bicycle", "boat", "bus", "car", "motorcycle", "train", "truck"),
                   "animal": ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")}


def canonical(name: str) -> str:
    """A category name in COCO's spelling ("motorbike" -> "motorcycle", "tvmonitor" -> "tv")."""
    n = name.strip().lower()
    return VOC_TO_COCO.get(n.replace(" ", ""), n)


def category_matches(names, classes) -> list[str]:
    """The classes of one dataset (`classes`, its own spelling) that `names` denote: category
    names in any dataset's spelling, or group names (CATEGORY_GROUPS)."""
    wanted = set()
    for n in names:
        wanted |= set(CATEGORY_GROUPS.get(n.strip().lower(), (canonical(n),)))
    return [c for c in classes if canonical(c) in wanted]


def removal_categories(names, pretrain_classes, finetune_classes) -> tuple[list[str], list[str]]:
    """--remove-categories as the pre-training set's classes to remove and the fine-tuning set's
    classes Tab. 2 scores (e.g. "vehicle", or "car bus truck": VOC has no truck)."""
    unknown = [n for n in names if not category_matches([n], [*pretrain_classes, *finetune_classes])]
    if unknown:
        raise ValueError(f"--remove-categories {unknown}: not a class of the pre-training set "
                         f"{list(pretrain_classes)} or of the fine-tuning set {list(finetune_classes)} (COCO or "
                         f"VOC spelling), nor a group {sorted(CATEGORY_GROUPS)}")
    pre, down = category_matches(names, pretrain_classes), category_matches(names, finetune_classes)
    if not pre or not down:
        which = "pre-training" if not pre else "fine-tuning"
        raise ValueError(f"--remove-categories {names}: none is a class of the {which} set "
                         f"{list(pretrain_classes if not pre else finetune_classes)}; Tab. 2 removes them from the "
                         "first and scores them on the second")
    return pre, down


def without_categories(dataset, names) -> list[int]:
    """Indices of the images holding none of the categories `names` (Tab. 2's pre-training set)."""
    unknown = [n for n in names if n not in dataset.classes]
    if unknown:
        raise ValueError(f"--remove-categories {unknown} are not classes of the pre-training set "
                         f"{list(dataset.classes)}")
    drop = {list(dataset.classes).index(n) + 1 for n in names}
    return [i for i in range(len(dataset)) if not drop & set(dataset.annotations(i)["labels"].tolist())]


def image_label(annotations: dict) -> int:
    """The class (0..C-1) of an image's largest box: its label for classification pre-training on a
    detection set (IMAGENET-LOC's images hold one labelled class each)."""
    b = np.asarray(annotations["boxes"], np.float64).reshape(-1, 4)
    return int(annotations["labels"][np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))]) - 1


# ============================================================================================
# Data
# ============================================================================================
def collate_classification(batch):
    """(list of images, list of {"label"}): the shared loop's (images, targets) shape."""
    return [img for img, _ in batch], [{"label": torch.tensor(lab)} for _, lab in batch]


def classification_loss(model, images, targets) -> dict:
    return {"loss_ce": F.cross_entropy(model(torch.stack(images)), torch.stack([t["label"] for t in targets]))}


class ImageLabels(torch.utils.data.Dataset):
    """A detection set as a classification set, each image labelled by `image_label`."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform, self.classes = dataset, transform, dataset.classes
        self.labels = [image_label(dataset.annotations(i)) for i in range(len(dataset))]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.transform(self.dataset[i][0]), self.labels[i]


def cls_dataset(args, split: str, augment: bool):
    """A classification split with ImageNet augmentation (`augment`) or the evaluation transform."""
    n = args.synthetic_train if split == args.cls_train_split else args.synthetic_test
    return build_classification_dataset(args.cls_data, split, classification_transforms(augment, args.cls_size),
                                        num_images=n, image_size=args.synthetic_size, seed=args.seed)


def det_dataset(args, split: str, data: str = "", transforms=None, train: bool = False):
    """A detection split; synthetic sizes follow the split's role (train / pre-train / test).
    `train`: a training set (crowd boxes and images without a box dropped; see common.data)."""
    n = {args.det_train_split: args.synthetic_train, args.pretrain_split: args.synthetic_pretrain}.get(
        split, args.synthetic_test)
    return build_detection_dataset(data or args.det_data, split, transforms, num_images=n,
                                   image_size=args.synthetic_size, seed=args.seed, train=train)


def detector_kwargs(args) -> dict:
    return dict(backbone=args.backbone, min_size=args.det_test_size, max_size=args.det_max_size,
                anchor_sizes=args.anchor_sizes, box_batch_size_per_image=args.box_batch_per_image,
                rpn_post_nms_top_n_test=args.test_proposals)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation: (B, 3, H, W) back to [0, 1]."""
    mean, std = torch.tensor(MEAN, device=x.device), torch.tensor(STD, device=x.device)
    return (x * std[:, None, None] + mean[:, None, None]).clamp(0, 1)


@torch.no_grad()
def extract(fn, loader, device) -> tuple[dict, np.ndarray]:
    """Run `fn(images) -> {name: (B, D)}` over this rank's shard of an evaluation loader, gather
    every rank's rows and return them in dataset order, with the labels."""
    indices = list(loader.batch_sampler.sampler)
    feats, labels = {}, []
    for images, targets in loader:
        for k, v in fn(torch.stack(images).to(device)).items():
            feats.setdefault(k, []).append(v.float().cpu())
        labels += [int(t["label"]) for t in targets]
    local = (indices, {k: torch.cat(v).numpy() for k, v in feats.items()}, labels)
    merged = {}
    for idx, f, lab in all_gather_object(local):
        for r, i in enumerate(idx):
            merged.setdefault(i, ({k: v[r] for k, v in f.items()}, lab[r]))
    order = sorted(merged)
    names = merged[order[0]][0].keys()
    return {k: np.stack([merged[i][0][k] for i in order]) for k in names}, np.asarray([merged[i][1] for i in order])


# ============================================================================================
# Training: detection fine-tuning (Sec. 2.1), classification fine-tuning (Tab. 8), pre-training
# ============================================================================================
def _done(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, obj) -> None:
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(obj, path)


def finetune_detection(args, env, net: Net, out: Path) -> dict:
    """Sec. 2.1: the backbone of `net` in a detector whose heads start afresh, fine-tuned with
    horizontal flips for --det-epochs (LR x0.1 after --det-lr-steps), then VOC AP at each IoU."""
    if (res := _done(out / "result.json")) is not None:
        return res
    train_set = det_dataset(args, args.det_train_split,
                            transforms=detection_transforms(True, args.det_scales, args.det_max_size, args.hflip),
                            train=True)
    test_set = det_dataset(args, args.det_test_split, args.det_test_data, detection_transforms(False))
    seed_everything(args.seed)  # identical head initialisation for every network
    model = build_detector(args.arch, len(train_set.classes), norm="frozen_bn", **detector_kwargs(args))
    load_weights(model, net.backbone, verbose=is_main())  # backbone only: detection heads re-initialised
    model.to(env.device)
    per_rank = max(1, args.det_batch_size // env.world_size)  # --det-batch-size is global
    loader = build_loader(train_set, per_rank, True, args.workers, args.seed)
    test_loader = build_loader(test_set, per_rank, False, args.workers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.det_lr, momentum=0.9, weight_decay=1e-4)
    iters = len(loader)
    scheduler = build_scheduler(optimizer, args.det_epochs * iters, warmup_steps=min(args.det_warmup, iters),
                                milestones=[e * iters for e in args.det_lr_steps])
    train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=args.det_epochs, out_dir=out,
                   args=args, amp=args.amp, clip_grad=args.clip_grad,
                   resume=resolve_resume(args.resume, out, run_dir=args.out), desc=f"detection {net.name}")
    predictions, targets = predict(model, test_loader, env.device)
    curve = ap_vs_iou(predictions, targets, sorted(set(args.iou_thresholds) | {0.5, 0.7}),
                      sniper_07_metric(args.det_test_data or args.det_data))
    names = list(test_set.classes)
    res = {"net": net.name, "mAP": {f"{t:g}": m["mAP"] for t, m in curve.items()},
           "AP": {f"{t:g}": {names[c - 1]: ap for c, ap in m["AP"].items()} for t, m in curve.items()}}
    _write_json(out / "result.json", res)
    return res


def train_classifier(args, env, model, train_set, out: Path, *, epochs=None, lr, batch_size, max_steps=None,
                     desc="classify") -> nn.Module:
    """Cross-entropy training through the shared loop (SGD momentum 0.9, wd 1e-4, cosine LR) for
    `epochs`, or `max_steps` iterations."""
    model.to(env.device)
    per_rank = max(1, batch_size // env.world_size)  # batch_size is global
    loader = build_loader(train_set, per_rank, True, args.workers, args.seed, collate_fn=collate_classification,
                          group_by_aspect_ratio=False)
    total = max_steps or epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total, warmup_steps=min(50, total // 10), schedule="cosine")
    train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=epochs or math.ceil(total / len(loader)),
                   out_dir=out, args=args, loss_fn=classification_loss, amp=args.amp, clip_grad=args.clip_grad,
                   resume=resolve_resume(args.resume, out, run_dir=args.out), max_steps=max_steps, desc=desc)
    return model.eval()


def finetune_classification(args, env, net: Net, out: Path) -> dict:
    """Tab. 8: the backbone of `net` with a new linear layer, all of it fine-tuned; top-1 on the test set."""
    if (res := _done(out / "result.json")) is not None:
        return res
    train_set = cls_dataset(args, args.cls_train_split, True)
    test_set = cls_dataset(args, args.cls_test_split, False)
    seed_everything(args.seed)
    model = build_classifier(args.backbone, len(train_set.classes))
    load_weights(model, net.backbone, verbose=False)
    train_classifier(args, env, model, train_set, out, epochs=args.cls_epochs, lr=args.cls_lr,
                     batch_size=args.cls_batch_size, desc=f"classification {net.name}")
    loader = build_loader(test_set, max(1, args.cls_batch_size // env.world_size), False, args.workers,
                          collate_fn=collate_classification)
    logits, labels = extract(lambda x: {"logits": model(x)}, loader, env.device)
    res = {"net": net.name, "top1": float((logits["logits"].argmax(1) == labels).mean())}
    _write_json(out / "result.json", res)
    return res


def pretrain_iterations(args, num_images: int) -> int:
    """Iterations of every Tab. 2 pre-training: --pretrain-steps, else --pretrain-epochs over the
    full pre-training set at the global --pretrain-batch-size."""
    return args.pretrain_steps or int(math.ceil(args.pretrain_epochs * num_images / args.pretrain_batch_size))


def pretrain_detector(args, env, dataset, out: Path, total: int, init: Net | None = None) -> Path:
    """Detection pre-training (Tab. 2): the whole detector trained on `dataset` for `total`
    iterations, from `init`'s backbone or from scratch. Returns the checkpoint path."""
    final = out / "checkpoint.pth"
    if (out / "done").is_file():
        return final
    seed_everything(args.seed)
    model = build_detector(args.arch, len(dataset.classes), norm=args.pretrain_norm,
                           trainable_layers=args.pretrain_trainable_layers, **detector_kwargs(args))
    if init is not None:
        load_weights(model, init.backbone, verbose=is_main())
    model.to(env.device)
    per_rank = max(1, args.pretrain_batch_size // env.world_size)  # global batch
    loader = build_loader(dataset, per_rank, True, args.workers, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.pretrain_lr, momentum=0.9, weight_decay=1e-4)
    scheduler = build_scheduler(optimizer, total, warmup_steps=min(args.det_warmup, total // 5),
                                milestones=[int(total * 2 / 3), int(total * 8 / 9)])
    train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=int(math.ceil(total / len(loader))),
                   out_dir=out, args=args, amp=args.amp, clip_grad=args.clip_grad, max_steps=total,
                   resume=resolve_resume(args.resume, out, run_dir=args.out), desc=f"pre-train {out.name}")
    _finish(out)
    return final


def pretrain_classifier(args, env, dataset, out: Path, total: int, init: Net | None = None) -> Path:
    """Classification pre-training on a detection set's image labels (Tab. 2 / 7 "IMAGENET-LOC
    (Cls)"): the same images, iterations, batch and LR as `pretrain_detector`, from the same init."""
    final = out / "checkpoint.pth"
    if (out / "done").is_file():
        return final
    seed_everything(args.seed)
    model = build_classifier(args.backbone, len(dataset.classes))
    if init is not None:
        load_weights(model, init.backbone, verbose=is_main())
    train_classifier(args, env, model, ImageLabels(dataset, classification_transforms(True, args.cls_size)), out,
                     lr=args.pretrain_lr, batch_size=args.pretrain_batch_size, max_steps=total,
                     desc=f"pre-train {out.name}")
    _finish(out)
    return final


def _finish(out: Path) -> None:
    if is_main():
        (out / "done").write_text("finished\n")
    barrier()


# ============================================================================================
# Experiments (each returns its table; rank 0 writes the figures and the report)
# ============================================================================================
class Features:
    """Average-pooled Conv5 of every network on the classification splits, computed once (in the
    process group: every rank extracts its shard and receives every row)."""

    def __init__(self, args, env, nets):
        self.args, self.env, self.nets, self.cache = args, env, nets, {}

    def __call__(self, name: str, split: str):
        if (name, split) not in self.cache:
            args = self.args
            resnet = backbone_model(self.nets[name], args.backbone).to(self.env.device)
            loader = build_loader(cls_dataset(args, split, False), max(1, args.cls_batch_size // self.env.world_size),
                                  False, args.workers, collate_fn=collate_classification)
            f, y = extract(lambda x: conv5_features(resnet, x), loader, self.env.device)
            self.cache[(name, split)] = (f["conv5"], y)
        return self.cache[(name, split)]


# --------------------------------------------------------------------------------------------
# The analyses run after the process group is gone: mask-out at stride 1 is 50,176 forward passes
# an image, a probe on ConvProj (256,14,14) minutes of L-BFGS, k-means up to k = 1000 and t-SNE
# minutes of one CPU thread; a rank waiting for them in a collective would be killed by NCCL's
# 10-minute watchdog. Each rank does its share of the units and passes the results through files.
# --------------------------------------------------------------------------------------------
def rank_share(units: list, rank: int, world_size: int) -> list:
    """The units rank `rank` does: every `world_size`-th from its own, so each unit is done exactly
    once and the ranks' shares differ by at most one unit."""
    return units[rank::world_size]


class Exchange:
    """Results passed between ranks without a process group: each rank `put`s its results of a
    phase into `root/<phase>.rank<r>.pt`; `gather` polls the folder (no collective, no timeout: a
    failed rank ends the whole torchrun job) until every rank's file is there, and merges them."""

    def __init__(self, root: Path, rank: int, world_size: int):
        self.root, self.rank, self.world_size = Path(root), rank, world_size

    def put(self, phase: str, results: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{phase}.rank{self.rank}.pt"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(results, tmp)
        os.replace(tmp, path)

    def gather(self, phase: str, poll_s: float = 1.0) -> dict:
        paths = [self.root / f"{phase}.rank{r}.pt" for r in range(self.world_size)]
        while not all(p.is_file() for p in paths):
            time.sleep(poll_s)
        return {k: v for p in paths for k, v in torch.load(p, weights_only=True).items()}


def analysis_units(todo, nets) -> list[tuple[str, str]]:
    """The first phase's units: (what, network). A Tab. 6 probe is also the classifier of Fig. 5."""
    units = []
    for name in nets:
        if "probes" in todo or "visualisation" in todo:
            units.append(("probe", name))
        if "head-probes" in todo:
            units.append(("head-probes", name))
        if "features" in todo:
            units += [("kmeans", name), ("tsne", name)]
    return units


def run_unit(args, env, nets, feats, unit) -> dict:
    """One unit of the first phase, on this rank alone."""
    what, name = unit
    test_x, test_y = feats(name, args.cls_test_split)
    if what == "probe":  # Tab. 6
        train_x, train_y = feats(name, args.cls_train_split)
        acc, linear = linear_probe(train_x, train_y, test_x, test_y, args.probe_c, args.seed,
                                   len(cls_dataset(args, args.cls_test_split, False).classes))
        return {"top1": acc, "weight": linear.weight.detach(), "bias": linear.bias.detach()}
    if what == "head-probes":  # Tab. 5
        det = head_detector(nets[name], args.backbone, args.cls_size)
        if det is None:
            return {}
        det.to(env.device)
        fn = lambda x: detection_head_features(det, to_unit(x))  # noqa: E731
        tr, te = (extract(fn, build_loader(cls_dataset(args, split, False), args.cls_batch_size, False, args.workers,
                                           collate_fn=collate_classification), env.device)
                  for split in (args.cls_train_split, args.cls_test_split))
        return {k: linear_probe(tr[0][k], tr[1], te[0][k], te[1], args.probe_c, args.seed)[0] for k in HEAD_FEATURES}
    if what == "kmeans":  # Fig. 6
        ks = cluster_counts(len(test_y), args.kmeans_max, args.kmeans_points)
        return {k: torch.as_tensor(v) for k, v in kmeans_labels(test_x, ks, args.seed).items()}
    from sklearn.manifold import TSNE  # Fig. 7

    tsne = TSNE(2, perplexity=min(30.0, (len(test_y) - 1) / 3), init="pca", random_state=args.seed)
    return {"xy": torch.as_tensor(tsne.fit_transform(test_x))}


def run_analyses(args, env, nets, feats, todo, report: Path, exchange: Exchange) -> dict:
    """Tab. 5, Tab. 6, App. 6.1 (Fig. 3-7), sharded over the ranks in two phases: the probes,
    k-means and t-SNE, then the mask-out maps (which need the probes). Rank 0 assembles the tables
    and figures; the other ranks return {}."""
    units = analysis_units(todo, nets)
    mine = {"/".join(u): run_unit(args, env, nets, feats, u) for u in rank_share(units, env.rank, env.world_size)}
    exchange.put("fit", mine)
    if env.rank != 0 and "visualisation" not in todo:
        return {}
    fits = exchange.gather("fit")  # every rank: the mask-out maps below need every probe
    maps = {}
    if "visualisation" in todo:
        probes = {name: _linear(fits[f"probe/{name}"]) for name in nets}
        picks = mask_out_picks(args, nets, feats, probes)
        test_set = cls_dataset(args, args.cls_test_split, False)
        for name, i in rank_share([(n, i) for n in nets for i in picks], env.rank, env.world_size):
            model = ProbedNet(backbone_model(nets[name], args.backbone), probes[name]).to(env.device).eval()
            image, label = test_set[i]
            with torch.no_grad():
                unmasked = float(model(image[None].to(env.device)).softmax(1)[0, label])
            m = mask_out_map(model, image.to(env.device), label, args.mask_patch, args.mask_stride)
            maps[f"{name}/{i}"] = {"map": m, "label": int(label), "unmasked": unmasked}
        exchange.put("mask", maps)
        if env.rank != 0:
            return {}
        maps = exchange.gather("mask")
    if env.rank != 0:
        return {}
    results = {}
    if "probes" in todo:
        results["probes"] = {name: {"top1": fits[f"probe/{name}"]["top1"]} for name in nets}
    if "head-probes" in todo:
        results["head-probes"] = {name: fits[f"head-probes/{name}"] for name in nets if fits[f"head-probes/{name}"]}
    if "features" in todo:
        results["features"] = features_report(args, nets, feats, fits, report)
    if "visualisation" in todo:
        results["visualisation"] = visualisation_report(args, env, nets, maps, picks, report)
    return results


def _linear(fit: dict) -> nn.Linear:
    linear = nn.Linear(fit["weight"].shape[1], fit["weight"].shape[0])
    linear.load_state_dict({"weight": fit["weight"], "bias": fit["bias"]})
    return linear


def mask_out_picks(args, nets, feats, probes) -> list[int]:
    """Fig. 5's test images: those every network's probe classifies correctly first (the
    probability of a class no network predicts is near zero everywhere), then the others."""
    right = None
    for name in nets:
        x_test, y_test = feats(name, args.cls_test_split)
        with torch.no_grad():
            ok = probes[name](torch.as_tensor(x_test)).argmax(1).numpy() == y_test
        right = ok if right is None else right & ok
    return (np.flatnonzero(right).tolist() + np.flatnonzero(~right).tolist())[:args.vis_images]


def features_report(args, nets, feats, fits, report: Path) -> dict:
    """App. 6.1 from the clusterings and embeddings: k-means co-membership (Fig. 6), closest and
    close-but-distant pairs (Fig. 3), t-SNE (Fig. 7)."""
    import matplotlib.pyplot as plt

    split = args.cls_test_split
    x = {name: feats(name, split)[0] for name in nets}
    labels = feats(next(iter(nets)), split)[1]
    clusters = {name: {k: v.numpy() for k, v in fits[f"kmeans/{name}"].items()} for name in nets}
    ks = sorted(clusters[next(iter(nets))])
    dists = {name: cosine_distances(f) for name, f in x.items()}
    res = {"cluster_counts": ks, "pairs": {}}
    fig, ax = plt.subplots(figsize=(6, 4))
    for a, b in itertools.combinations(nets, 2):
        curve = [comembership(clusters[a][k], clusters[b][k]) for k in ks]
        res["pairs"][f"{a}|{b}"] = {"k": ks, f"P({b}|{a})": [c[0] for c in curve], f"P({a}|{b})": [c[1] for c in curve]}
        ax.plot(ks, [c[0] for c in curve], marker="o", label=f"together in {b} | together in {a}")
        ax.plot(ks, [c[1] for c in curve], marker="s", label=f"together in {a} | together in {b}")
        fine, coarse = max(ks), (4 if 4 in ks else min(ks))
        columns = {f"closest in {a}": closest_pairs(dists[a], args.pairs),
                   f"close in {a}, distant in {b}": close_but_distant_pairs(dists[a], clusters[a][fine],
                                                                            clusters[b][coarse], args.pairs),
                   f"close in {b}, distant in {a}": close_but_distant_pairs(dists[b], clusters[b][fine],
                                                                            clusters[a][coarse], args.pairs),
                   f"closest in {b}": closest_pairs(dists[b], args.pairs)}
        res["pairs"][f"{a}|{b}"]["examples"] = {k: [p[:2] for p in v] for k, v in columns.items()}
        _pairs_figure(args, columns, report / f"fig3_pairs_{a}_vs_{b}.png")
    ax.set_xscale("log")
    ax.set(xlabel="number of clusters", ylabel="probability", ylim=(0, 1.02), title="Fig. 6: k-means co-membership")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "fig6_comembership.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(nets), figsize=(4 * len(nets), 4), squeeze=False)
    for ax, name in zip(axes[0], nets):
        xy = fits[f"tsne/{name}"]["xy"].numpy()
        ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10" if labels.max() < 10 else "nipy_spectral", s=6)
        ax.set(title=f"Fig. 7: t-SNE of Conv5, {name}", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(report / "fig7_tsne.png", dpi=120)
    plt.close(fig)
    return res


def _pairs_figure(args, columns: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    test_set = cls_dataset(args, args.cls_test_split, False)
    rows = max(1, max(len(v) for v in columns.values()))
    fig, axes = plt.subplots(rows, 2 * len(columns), figsize=(2.2 * len(columns) * 2, 2.2 * rows), squeeze=False)
    for c, (title, pairs) in enumerate(columns.items()):
        axes[0, 2 * c].set_title(title, fontsize=8, loc="left")
        for r in range(rows):
            for s in range(2):
                ax = axes[r, 2 * c + s]
                ax.axis("off")
                if r < len(pairs):
                    ax.imshow(to_unit(test_set[pairs[r][s]][0][None])[0].permute(1, 2, 0).numpy())
    fig.suptitle("Fig. 3: image pairs in Conv5 space", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def visualisation_report(args, env, nets, maps: dict, picks: list[int], report: Path) -> dict:
    """Fig. 4 (Conv5 activation maps, computed here: a few forward passes) and Fig. 5 (the mask-out
    maps the ranks computed, with the Tab. 6 probe on top). Rank 0."""
    import matplotlib.pyplot as plt

    test_set = cls_dataset(args, args.cls_test_split, False)
    eval_tf = classification_transforms(False, args.cls_size)
    scenes = det_dataset(args, args.det_test_split, args.det_test_data)
    k = args.vis_images
    images = [test_set[i][0] for i in range(min(k, len(test_set)))]
    images += [eval_tf(scenes[i][0]) for i in range(min(k, len(scenes)))]  # several objects (Fig. 4 c-e)
    x = torch.stack(images).to(env.device)
    models = {name: backbone_model(net, args.backbone).to(env.device) for name, net in nets.items()}

    fig, axes = plt.subplots(len(x), 1 + len(nets), figsize=(2.2 * (1 + len(nets)), 2.2 * len(x)), squeeze=False)
    for r in range(len(x)):
        img = to_unit(x[r:r + 1])[0].permute(1, 2, 0).cpu().numpy()
        axes[r, 0].imshow(img)
        for c, (name, resnet) in enumerate(models.items(), start=1):
            amap = activation_maps(resnet, x[r:r + 1])
            amap = F.interpolate(amap[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            amap = (amap - amap.min()) / (amap.max() - amap.min() + 1e-12)
            axes[r, c].imshow(img)
            axes[r, c].imshow(amap.cpu().numpy(), cmap="jet", alpha=0.5)
            if r == 0:
                axes[r, c].set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle("Fig. 4: Conv5 activation maps", fontsize=9)
    fig.tight_layout()
    fig.savefig(report / "fig4_activation_maps.png", dpi=100)
    plt.close(fig)

    res = {name: [] for name in nets}
    fig, axes = plt.subplots(len(picks), 1 + len(nets), figsize=(2.2 * (1 + len(nets)), 2.2 * len(picks)),
                             squeeze=False)
    for r, i in enumerate(picks):
        axes[r, 0].imshow(to_unit(test_set[i][0][None])[0].permute(1, 2, 0).numpy())
        for c, name in enumerate(nets, start=1):
            m = maps[f"{name}/{i}"]
            res[name].append({"image": i, "label": m["label"], "min": float(m["map"].min()),
                              "mean": float(m["map"].mean()), "unmasked": m["unmasked"]})
            axes[r, c].imshow(m["map"].numpy(), cmap="jet", vmin=0, vmax=1)
            if r == 0:
                axes[r, c].set_title(f"{name}: P(correct)", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"Fig. 5: mask-out maps ({args.mask_patch}x{args.mask_patch} blank patch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(report / "fig5_mask_out.png", dpi=100)
    plt.close(fig)
    return res


def run_removal(args, env, nets, report: Path, todo) -> dict:
    """Tab. 2 and Tab. 7, controlled: from the same init (--pretrain-init), on the same pre-training
    images, for the same iterations, a classifier on the images' labels, a detector on every image
    and a detector on the images without --remove-categories; each fine-tuned like every network.
    VOC AP at IoU 0.7 on the removed categories (Tab. 2), mAP@0.5 / 0.7 and top-1 (Tab. 7)."""
    pre = det_dataset(args, args.pretrain_split, args.pretrain_data, train=True)
    pre_det = det_dataset(args, args.pretrain_split, args.pretrain_data,
                          detection_transforms(True, args.det_scales, args.det_max_size, args.hflip), train=True)
    downstream = det_dataset(args, args.det_test_split, args.det_test_data).classes
    removed_pre, removed = removal_categories(args.remove_categories, pre.classes, downstream)
    keep = without_categories(pre, removed_pre)
    if not keep:
        raise ValueError(f"no pre-training image is left without {removed_pre}")
    init = nets[args.pretrain_init] if args.pretrain_init else None
    total = pretrain_iterations(args, len(pre))  # the same for all three (CHOICE)
    root = report / "removal" / (init.key if init else "scratch")
    label = "det w/o " + "+".join(args.remove_categories)
    ckpts = {"cls (image labels)": (pretrain_classifier(args, env, pre, root / "cls", total, init), "cls"),
             "det": (pretrain_detector(args, env, pre_det, root / "det", total, init), "det"),
             label: (pretrain_detector(args, env, DetectionSubset(pre_det, keep), root / "det_without", total, init),
                     "det")}
    res = {"removed": removed, "removed_from_pretraining": removed_pre, "pretrain_images": len(keep),
           "of": len(pre), "iterations": total, "AP@0.7": {}, "table7": {}}
    for name, (ckpt, kind) in ckpts.items():
        net = load_net(f"{name}={ckpt}:{kind}", args.backbone)
        r = finetune_detection(args, env, net, report / "detection" / net.key)
        ap = [r["AP"]["0.7"].get(c, math.nan) for c in removed]  # NaN: no ground truth in the test set
        res["AP@0.7"][name] = {**dict(zip(removed, ap)), "mean": float(np.mean(ap))}
        if name != label:
            res["table7"][name] = {"mAP@0.5": r["mAP"]["0.5"], "mAP@0.7": r["mAP"]["0.7"]}
            if "classification" in todo:
                top1 = finetune_classification(args, env, net, report / "classification" / net.key)["top1"]
                res["table7"][name]["top1"] = top1
    return res


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


# ============================================================================================
# Report
# ============================================================================================
def ap_curve_figure(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results.items():
        ts = sorted(r["mAP"], key=float)
        ax.plot([float(t) for t in ts], [100 * r["mAP"][t] for t in ts], marker="o", label=name)
    ax.set(xlabel="IoU threshold", ylabel="mAP (%)", title="Fig. 1: detection mAP at different IoUs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _table(title: str, header: list, rows: list) -> list[str]:
    """A Markdown section: title, then a table of `header` and `rows` (cells as given)."""
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731  (a bare | splits a cell)
    return [f"## {title}", "", "| " + " | ".join(map(cell, header)) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(map(cell, r)) + " |" for r in rows], ""]


def markdown(results: dict, nets: dict, args) -> str:
    """report.md: every table of the report, as percentages."""
    lines = ["# Detection vs classification pre-training", "",
             "Networks: " + ", ".join(f"`{n}` ({v.kind}, {v.source})" for n, v in nets.items()), ""]
    if det := results.get("detection"):
        ts = [f"{t:g}" for t in args.iou_thresholds]
        lines += _table("Table 1: detection fine-tuning (VOC AP, %)", ["network", "mAP@0.5", "mAP@0.7"],
                        [[n, _pct(r["mAP"]["0.5"]), _pct(r["mAP"]["0.7"])] for n, r in det.items()])
        lines += _table("Fig. 1: mAP at each IoU (%), `fig1_ap_vs_iou.png`", ["network", *ts],
                        [[n, *(_pct(r["mAP"][t]) for t in ts)] for n, r in det.items()])
    for key, title in (("classification", "Table 8: classification fine-tuning (top-1, %)"),
                       ("probes", "Table 6: linear probe on average-pooled Conv5 (top-1, %)")):
        if key in results:
            lines += _table(title, ["network", "top-1"], [[n, _pct(r["top1"])] for n, r in results[key].items()])
    if hp := results.get("head-probes"):
        lines += _table("Table 5: linear probes on detection-head features (top-1, %)", ["feature", *hp],
                        [[f, *(_pct(hp[n][f]) for n in hp)] for f in HEAD_FEATURES])
    if "features" in results:
        for pair, r in results["features"]["pairs"].items():
            (pa, va), (pb, vb) = [(k, v) for k, v in r.items() if k.startswith("P(")]
            lines += _table(f"Fig. 6: k-means co-membership, {pair} (%), `fig6_comembership.png` (Fig. 3 "
                            "`fig3_pairs_*.png`, Fig. 7 `fig7_tsne.png`)", ["k", pa, pb],
                            [[k, _pct(x), _pct(y)] for k, x, y in zip(r["k"], va, vb)])
    if vis := results.get("visualisation"):
        lines += _table("Fig. 4 / 5: `fig4_activation_maps.png`, `fig5_mask_out.png` (P(correct), %)",
                        ["network", "unmasked", "mean over patch positions", "min over positions"],
                        [[n, *(_pct(np.mean([r[k] for r in rows])) for k in ("unmasked", "mean", "min"))]
                         for n, rows in vis.items()])
    if rm := results.get("removal"):
        cats = rm["removed"]
        lines += _table(f"Table 2: AP@0.7 (%) on categories removed from pre-training ({rm['pretrain_images']} of "
                        f"{rm['of']} pre-training images kept, {rm['iterations']} iterations each)",
                        ["network", *cats, "mean"],
                        [[n, *(_pct(r[c]) for c in cats), _pct(r["mean"])] for n, r in rm["AP@0.7"].items()])
        lines += _table("Table 7: identical pre-training samples (%)", ["network", "mAP@0.5", "mAP@0.7", "top-1"],
                        [[n, _pct(r["mAP@0.5"]), _pct(r["mAP@0.7"]), _pct(r.get("top1"))]
                         for n, r in rm["table7"].items()])
    return "\n".join(lines)


# ============================================================================================
# main
# ============================================================================================
def main(args) -> dict:
    if args.demo:
        return demo(args)
    if len(args.net) < 2:
        raise SystemExit("give two or more networks: --net NAME=PATH[:KIND] --net NAME=PATH[:KIND]")
    todo = EXPERIMENTS if "all" in args.experiments else tuple(args.experiments)
    if "removal" in todo and not args.remove_categories:
        todo = tuple(e for e in todo if e != "removal")
        if "removal" in args.experiments:
            raise SystemExit("--experiments removal needs --remove-categories NAME [NAME ...]")
    analyses = [e for e in ("probes", "head-probes", "features", "visualisation") if e in todo]
    env = init_distributed(args.device)
    report = Path(args.out)  # a folder every rank sees: the analyses pass their results through it
    exchange = Exchange(report / "ranks", env.rank, env.world_size)
    if env.rank == 0:
        report.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(exchange.root, ignore_errors=True)  # an earlier run's results
    t0 = time.time()
    nets = {}
    for spec in args.net:
        net = load_net(spec, args.backbone)
        if net.name in nets:
            raise SystemExit(f"two networks are named {net.name!r}")
        nets[net.name] = net
    if args.pretrain_init and args.pretrain_init not in nets:
        raise SystemExit(f"--pretrain-init {args.pretrain_init!r} is not one of the --net names {list(nets)}")
    results, feats = {}, Features(args, env, nets)

    def done(name):
        if env.rank == 0:
            write_json_atomic({"args": vars(args), "results": results}, report / "report.json")
            print(f"[{time.time() - t0:.0f}s] {name} done", flush=True)

    try:  # 1. in the process group: the trainings (DDP) and the Conv5 features (sharded, gathered)
        barrier()  # the exchange folder is clear before any rank writes to it
        if "detection" in todo:
            results["detection"] = {n: finetune_detection(args, env, v, report / "detection" / v.key)
                                    for n, v in nets.items()}
            done("detection")
        if "classification" in todo:
            results["classification"] = {n: finetune_classification(args, env, v, report / "classification" / v.key)
                                         for n, v in nets.items()}
            done("classification")
        if "removal" in todo:
            results["removal"] = run_removal(args, env, nets, report, todo)
            done("removal")
        splits = [args.cls_test_split] + ([args.cls_train_split] if {"probes", "visualisation"} & set(todo) else [])
        for name in nets if analyses else ():
            for split in splits:
                feats(name, split)
    finally:
        cleanup()
    # 2. without a process group: the analyses, each rank its share (rank_share), rank 0 the report
    if analyses:
        results.update(run_analyses(args, env, nets, feats, todo, report, exchange))
        done("+".join(analyses))
    if env.rank == 0:
        if "detection" in results:
            ap_curve_figure(results["detection"], report / "fig1_ap_vs_iou.png")
        text = markdown(results, nets, args)
        (report / "report.md").write_text(text + "\n")
        print(text)
        print(f"report: {report.resolve()} ({time.time() - t0:.0f}s)")
    return results


# ============================================================================================
# Demo: the paper's comparison on the synthetic benchmark, at the shared CPU recipe (common.demo)
# ============================================================================================
# The cls network is the demo classifier; the det network is the cls network + detection pre-
# training (the paper's detectors start from IMAGENET-CLS). Both are fine-tuned on other scenes,
# heads afresh (Sec. 2.1), and probed on object-centric images (Tab. 6).
DEMO = {"objects": 2000, "classifier_steps": 250,           # cls pre-training (object-centric, 64 px)
        "pretrain_scenes": 1600, "pretrain_steps": 200,     # + detection pre-training: the det network
        "finetune_scenes": 300, "finetune_steps": 120,      # fine-tuning of both (Fig. 1, Tab. 1)
        "test_scenes": 300, "probe_train": 1000, "probe_test": 500, "kmeans": (2, 4, 8, 16, 32)}


def demo(args) -> dict:
    """Sec. 2.1 / Fig. 1 (AP at IoU 0.1 ... 0.9) and Tab. 6 (Conv5 probe) for a cls and a det network
    on the synthetic benchmark; Fig. 6's co-membership as a table. Writes OUT/demo.json."""
    from common.demo import (DEMO_RECIPE, IMAGENET_MEAN, IMAGENET_STD, build_demo_detector, claim,
                             evaluate_demo_classifier, train_demo_classifier, train_demo_detector,
                             write_demo_result)
    from common.synthetic import SHAPES

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and args.resume != "auto":
        raise SystemExit(f"--out {out} is not empty: use a new folder (or --resume auto to overwrite)")
    t0, s, d, size = time.time(), args.seed, DEMO, DEMO_RECIPE["scene_size"]
    data = lambda n, k, mode="scenes": SyntheticDetection(n, size, mode=mode, seed=1000 * s + k,  # noqa: E731
                                                          cache="runs/synthetic_cache")
    objects, probe_train, probe_test = data(d["objects"], 1, "object"), data(d["probe_train"], 6, "object"), \
        data(d["probe_test"], 2, "object")
    pre, ft, test = data(d["pretrain_scenes"], 3), data(d["finetune_scenes"], 5), data(d["test_scenes"], 4)
    log = lambda msg: print(f"[demo {time.time() - t0:.0f}s] {msg}", flush=True)  # noqa: E731

    torch.manual_seed(s)
    cls = build_classifier(DEMO_RECIPE["backbone"], len(SHAPES), norm=DEMO_RECIPE["norm"])
    train_demo_classifier(cls, objects.classification(), d["classifier_steps"], seed=s, log=log)
    cls_top1 = evaluate_demo_classifier(cls, probe_test.classification())
    log(f"cls network: classifier top-1 {cls_top1:.3f}")
    torch.manual_seed(s)
    det = build_demo_detector(len(SHAPES), pretrained=cls.state_dict())
    train_demo_detector(det, pre, d["pretrain_steps"], seed=s, log=log)
    nets = {"cls": backbone_state_dict(cls), "det": backbone_state_dict(det)}
    log("det network: cls network + detection pre-training")

    norm = lambda im: (im.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]  # noqa: E731
    probes, conv5 = {}, {}
    for name, state in nets.items():  # Tab. 6: linear probe on average-pooled Conv5
        resnet = build_classifier(DEMO_RECIPE["backbone"], len(SHAPES), norm=DEMO_RECIPE["norm"])
        resnet.load_state_dict(state, strict=False)
        resnet.eval()
        f = {}
        for split, ds in (("train", probe_train), ("test", probe_test)):
            view = ds.classification()
            x = torch.stack([norm(view[i][0]) for i in range(len(view))])
            f[split] = (torch.cat([conv5_features(resnet, b)["conv5"] for b in x.split(250)]).numpy(),
                        np.array([view[i][1] for i in range(len(view))]))
        probes[name] = linear_probe(*f["train"], *f["test"], args.probe_c, s, len(SHAPES))[0]
        conv5[name] = kmeans_labels(f["test"][0], d["kmeans"], s)
    comem = [comembership(conv5["cls"][k], conv5["det"][k]) for k in d["kmeans"]]
    log(f"Conv5 probes: cls {probes['cls']:.3f}, det {probes['det']:.3f}")

    thresholds = [round(0.1 * i, 1) for i in range(1, 10)]
    curves = {}
    for name, state in nets.items():  # Sec. 2.1: the backbone only, detection heads afresh
        torch.manual_seed(s)
        model = build_demo_detector(len(SHAPES), pretrained=state)
        train_demo_detector(model, ft, d["finetune_steps"], seed=s, log=log)
        model.eval()
        with torch.no_grad():
            predictions = [p for k in range(0, len(test), 25)
                           for p in model([test[i][0].float() / 255 for i in range(k, min(len(test), k + 25))])]
        curve = ap_vs_iou(predictions, [test[i][1] for i in range(len(test))], thresholds)
        curves[name] = {f"{t:g}": curve[t]["mAP"] for t in thresholds}
        log(f"{name} fine-tuned: " + " ".join(f"{t}:{v:.3f}" for t, v in curves[name].items()))

    tables = {"fig1_mAP_at_IoU": curves, "tab6_conv5_probe_top1": probes, "cls_network_top1": cls_top1,
              "fig6_comembership": {"k": list(d["kmeans"]), "P(det|cls)": [c[0] for c in comem],
                                    "P(cls|det)": [c[1] for c in comem]},
              "budget": dict(d), "not_in_demo": "Tab. 2 (removal), 5 (head probes), 8 (classification fine-tuning), "
                                                "Fig. 3, 4, 5, 7: beyond the CPU budget or figures only"}
    claims = [claim("det pre-training > cls pre-training at AP@0.8", "AP@0.8",
                    ("det", curves["det"]["0.8"]), ("cls", curves["cls"]["0.8"])),
              claim("cls pre-training > det pre-training on the Conv5 linear probe", "probe top-1",
                    ("cls", probes["cls"]), ("det", probes["det"]))]
    write_demo_result(out, "det_pretrain_analysis.py", s, time.time() - t0, claims, tables)
    return tables


if __name__ == "__main__":
    main(get_args_parser().parse_args())
