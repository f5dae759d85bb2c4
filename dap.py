"""DAP: Detection-Aware Pre-training with Weak Supervision.

Zhong, Wang, Wang, Peng, Wang, Zhang, CVPR 2021. https://arxiv.org/abs/2103.16651

A classification data set (ImageNet) becomes a detection data set through class activation maps,
and a whole detector (backbone, FPN, RPN, heads) is pre-trained on it before fine-tuning (Fig. 1):

    classify      Step 1  a ResNet classifier, cross-entropy on image labels  (train_classifier)
    pseudo-boxes  Step 2  CAM -> pseudo boxes for every image                 (generate_pseudo_boxes)
    pretrain      Step 3  Faster R-CNN FPN trained on the pseudo boxes         (pretrain_detector)
    finetune      Step 4  downstream detector from DAP (or CLS) weights        (finetune_detector)

Equations -> functions (all pure, tensors in and out):
    CAM = FC row of the labelled class as a 1x1 conv     class_activation_maps
    Eq. (1)  min-max normalisation of a CAM               normalize_cam
    Eq. (2)  M = CAM * 1{CAM > tau}                       threshold_cam
    Eq. (3-6) box from the first and second moments       moment_boxes (inside cams_to_boxes)
    multi-threshold + NMS, one map / a batch of maps      cam_to_boxes / cams_to_boxes
    CAM over 2 scales and the flip (Sec. 4.1)             multiscale_cams

CHOICE (the paper is silent):
- Connected components are 8-connected (scipy.ndimage.label with a 3x3 structure).
- A component's "area" (the half-of-the-largest filter) is its pixel count.
- Pixel (row i, column j) covers [j, j+1) x [i, i+1): x = j + 0.5 in Eq. (3, 5), y = i + 0.5 in
  Eq. (4, 6); the box is (x_c - w/2, y_c - h/2, x_c + w/2, y_c + h/2), clipped to the map. A box
  with zero width or height (a one-pixel-thin component) is dropped. An all-equal map has no
  maximum to localise: Eq. (1) gives zeros there and no box comes out.
- NMS scores: box area (larger box kept), the released code's rule; the paper names no score.
- Classifier training (Step 1, when not loading torchvision/timm weights): the paper's IN-14M
  recipe (50 epochs, batch 8192, LR 3.2 = 0.1 x batch / 256, cosine) with 5 warm-up epochs
  (Goyal et al.; the paper does not mention warm-up), SGD momentum 0.9, weight decay 1e-4 on the
  weights only, none on BN parameters and biases (the usual large-batch practice; the paper is
  silent). The global batch of 8192 holds with `--accumulate K` (1,024 images per GPU on 8 GPUs
  do not fit; about 256 do, see --help).
- k-shot fine-tuning (Fig. 3-4): `common.data.kshot_subset`, k images per class, k x C in all
  (5-shot: 400 COCO images, 100 VOC images), every class in at least k of them, drawn with --seed;
  on VOC from the combined 07+12 trainval (`--protocol voc0712`), as Fig. 4 says; COCO from
  train2017. The iteration count is `--iters` (the paper tunes an early stop and gives none).
- Detector pre-training (Faster R-CNN): LR 0.008 at batch 64 (released config), scaled linearly to
  the batch (0.004 at the paper's 32); it decays x0.1 at 2/3 and 8/9 of the iterations
  (maskrcnn-benchmark's 1x ratios); max image side 1333 (maskrcnn-benchmark's default); stem and
  res2 frozen, frozen BN (maskrcnn-benchmark's defaults, as in fine-tuning); warm-up 2000
  iterations from 0.01 of the LR (released config). RetinaNet (Tab. 6-7): the paper's 80,072
  iterations at batch 32, LR 0.005 (Sec. 4.4), the same decay points and warm-up (the paper names
  none). `PRETRAIN` holds both; `--checkpoint-every` (1000) checkpoints inside the one epoch.
- Fine-tuning: the paper's schedules (`PROTOCOLS`); RetinaNet on COCO at LR 0.01 at batch 16 (the
  1x RetinaNet configs of maskrcnn-benchmark and Detectron2; the paper gives none, Faster R-CNN's
  is 0.02). Warm-up: maskrcnn-benchmark's defaults (500 iterations from 1/3 of the LR).
- CAM inputs are resized with bilinear, antialiased interpolation.
- CorLoc: an image counts when one of its pseudo boxes has IoU >= 0.5 with a true box of the
  labelled class; recall: the fraction of true boxes of that class hit at IoU >= 0.5.
- VOC training keeps the `difficult` boxes (common's default, as Detectron2's `load_voc_instances`);
  the authors' fine-tuning ran on maskrcnn-benchmark, whose VOC training set drops them
  (`use_difficult=False`, `common.data.VOCDetection(keep_difficult=False)` here). We follow
  Detectron2; evaluation ignores difficult objects either way (devkit).
- Evaluation: the VOC protocols test on VOC2007 test and report the paper's AP_5 (`voc_mAP50`, area)
  and AP_5,07metric (`voc07_mAP50`, 11-point), with AP / AP50 / AP75 as Detectron2's
  PascalVOCDetectionEvaluator gives them there (devkit AP, difficult objects ignored, 11-point
  metric; AP the mean over IoU 0.50:0.95); the coco protocol reports COCOeval's AP set.

Not implemented: self-training (Sec. 4.4, Tab. 9: pseudo labels of score >= 0.6, or the image's
best, on VOC 2012 trainval predicted with flip, then 2 more epochs on all data). Fine-tune on VOC07,
pseudo-label VOC12 with another tool, and fine-tune again with `finetune --init` to reproduce it.

Released-code facts followed (IMPLEMENTATION_NOTES.md, DAP):
- Scales 288 / 576 are short sides; images are zero-padded right/bottom to a multiple of 32; the
  flip is averaged on the feature map (flip back, then average) before the CAM; each scale's CAM is
  min-max normalised on its own, the 288 map is upsampled (nearest) to the 576 grid, and the two
  are averaged; box coordinates map back with the stride (32) and the resize factor.

DEVIATION (options, off by default): `--box-variant released` (cams_to_boxes(variant="released"))
reproduces the released code (`compute_box_imagenet1k.py`) where it differs from Eq. (1-6): the
averaged map is not re-normalised (each scale's map was); components are 4-connected (scipy's
default structure); a component's area is that of its bounding rectangle; at most 4 components per
threshold, largest first; the moments run over every thresholded pixel inside the component's
rectangle (pixels of other components there too), weighted by (cam + 0.22); w = max(1, sqrt(12 var)).

Full-scale commands (ImageNet-1k in ImageFolder layout; each stage's default --out is the next
stage's default input: runs/dap/cls -> runs/dap/pseudo_boxes -> runs/dap/det):
    python dap.py classify --data /data/imagenet --from-torchvision      # paper: torchvision's R50
    torchrun --nproc_per_node 8 dap.py pseudo-boxes --data /data/imagenet
    torchrun --nproc_per_node 8 dap.py pretrain --data /data/imagenet   # 1 epoch, batch 32 (40k it.)
    torchrun --nproc_per_node 8 dap.py finetune --protocol voc07 --data /data/VOCdevkit/VOC2007 \
        --init runs/dap/det/checkpoint.pth --out runs/dap/voc07_dap          # DAP
    torchrun --nproc_per_node 8 dap.py finetune --protocol voc07 --data /data/VOCdevkit/VOC2007 \
        --init runs/dap/cls/classifier.pth --out runs/dap/voc07_cls          # CLS baseline
    (--protocol voc0712 --data /data/VOCdevkit/VOC2007,/data/VOCdevkit/VOC2012; --protocol coco
    --data /data/coco; --kshot 5 --iters N for Fig. 3-4, on VOC with --protocol voc0712;
    --freeze-backbone on pretrain: Tab. 3; --arch retinanet on pretrain and finetune: Tab. 6-7;
    --backbone resnet101: Tab. 4-5; classify --accumulate 4 where 1,024 images a GPU do not fit)
CPU demo (the synthetic benchmark at common.demo's recipe, settings in DEMO: the four steps, the
classifier's top-1, the pseudo boxes' CorLoc / recall, CLS vs DAP at 5-shot -> OUT/demo.json):
    python dap.py --demo --seed 0 --out runs/dap_demo
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.ops import batched_nms, box_iou

from common.data import (build_classification_dataset, build_detection_dataset, build_loader,
                         classification_transforms, detection_transforms, kshot_subset, load_split, save_split,
                         subset_by_ids)
from common.detectors import build_classifier, build_detector, is_torchvision, load_weights, read_state_dict
from common.distributed import (cleanup, init_distributed, is_main, reduce_dict, seed_everything, unwrap,
                                wrap_ddp)
from common.engine import (JsonlLogger, autocast, build_scheduler, load_checkpoint, resolve_resume,
                           save_checkpoint, train_detector)
from common.synthetic import SyntheticDetection
from common.table import RaggedTable
from common.evaluation import evaluate_detector

STRIDE = 32  # ResNet C5 stride: one CAM cell covers 32 x 32 input pixels
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics (torchvision's detectors use them too)


# ============================================================================================
# Arguments: the paper's hyper-parameters, then system settings, per step
# ============================================================================================
PROTOCOLS = {  # Step 4 schedules, Sec. 4.1 (batch 16; LR x0.1 at the milestones, fractions of training)
    "voc07": dict(train_split="trainval", test_split="test", lr=0.01, lr_batch=16, epochs=14, iters=0,
                  milestones=[10 / 14], scales=[640], max_size=1066, test_size=640),
    "coco": dict(train_split="train2017", test_split="val2017", lr=0.02, lr_batch=16, epochs=0, iters=90000,
                 milestones=[60 / 90, 80 / 90], scales=[800], max_size=1333, test_size=800),
}
PROTOCOLS["voc0712"] = PROTOCOLS["voc07"]  # --data VOCdevkit/VOC2007,VOCdevkit/VOC2012; tested on 07 test
# RetinaNet fine-tuning on COCO: LR 0.01 at batch 16 (the 1x RetinaNet schedule of maskrcnn-benchmark's
# retinanet_R-50-FPN_1x and Detectron2's retinanet_R_50_FPN_1x); Faster R-CNN's 0.02 is for two-stage heads
PROTOCOL_ARCH = {("coco", "retinanet"): dict(lr=0.01)}

PRETRAIN = {  # Step 3 schedules per architecture (global batch 32, Sec. 4.1)
    # released config: LR 0.008 at batch 64, one epoch of IN-1k (about 40k iterations at batch 32)
    "faster_rcnn_fpn": dict(lr=0.008, lr_batch=64, epochs=1, iters=0),
    # Sec. 4.4: "80,072 steps with batch size 32 and learning rate 0.005"
    "retinanet": dict(lr=0.005, lr_batch=32, epochs=0, iters=80072),
}


def _fill(args, values: dict):
    if args.epochs is not None and args.iters is None:
        args.iters = 0  # --epochs alone: train for epochs
    for key, value in values.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def apply_protocol(args):
    """Fill every fine-tuning setting left unset (None) with the --protocol's value (for --arch)."""
    return _fill(args, {**PROTOCOLS[args.protocol], **PROTOCOL_ARCH.get((args.protocol, args.arch), {})})


def apply_pretrain_schedule(args):
    """Fill every Step 3 setting left unset (None) with --arch's schedule (PRETRAIN)."""
    return _fill(args, PRETRAIN[args.arch])


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("DAP: detection-aware pre-training", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("demo (no subcommand)")
    d.add_argument("--demo", action="store_true",
                   help="the four steps on the synthetic benchmark, then CLS vs DAP at 5-shot (CPU, minutes); "
                        "writes OUT/demo.json")
    d.add_argument("--seed", type=int, default=0, help="seeds the demo's data, initialisations and batch order")
    d.add_argument("--out", default="runs/dap_demo", help="output folder of --demo (must be new or empty)")
    d.add_argument("--resume", default="", choices=("", "auto"), help="auto: reuse the finished steps in --out")
    sub = p.add_subparsers(dest="command")

    def system(s, out, trains=True):
        g = s.add_argument_group("system")
        g.add_argument("--data", default="synthetic",
                       help="'synthetic', an ImageFolder root ({root}/train/<class>/), a COCO or VOC root")
        g.add_argument("--synthetic-images", type=int, default=512, help="images of a synthetic split")
        g.add_argument("--image-size", type=int, default=128, help="side of synthetic images")
        g.add_argument("--out", default=out, help="output folder")
        g.add_argument("--workers", type=int, default=4)
        g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--amp", action="store_true", help="mixed precision: float16 on CUDA, bfloat16 on the CPU")
        g.add_argument("--clip-grad", type=float, default=0.0,
                       help="max gradient norm of the detector steps (0: off, as in the paper)")
        g.add_argument("--resume", default="", help="checkpoint to continue from (must exist); 'auto': "
                                                    "--out/checkpoint.pth when there is one, else a fresh run")
        if trains:
            g.add_argument("--checkpoint-every", type=int, default=1000, metavar="N",
                           help="also write --out/checkpoint.pth every N iterations (0: at epoch ends only); "
                                "Step 3 is one 40k-iteration epoch")
        return g

    # Step 1 ----------------------------------------------------------------------------------
    s = sub.add_parser("classify", help="Step 1: classifier pre-training (cross-entropy)")
    h = s.add_argument_group("paper (Sec. 4.1)")
    h.add_argument("--backbone", default="resnet50", help="ResNet-50 (101 in Tab. 4-5)")
    h.add_argument("--epochs", type=int, default=50, help="IN-14M recipe, Sec. 4.1")
    h.add_argument("--batch-size", type=int, default=8192, help="global batch, Sec. 4.1")
    h.add_argument("--accumulate", type=int, default=1, metavar="K",
                   help="gradient accumulation: each rank runs K batches of batch / (ranks x K) per update, the "
                        "global batch stays --batch-size. 8192 on 8 GPUs is 1,024 images a GPU; about 256 of "
                        "224 px fit a ResNet-50 step with --amp on a 40-80 GB GPU (NVIDIA's reference recipe "
                        "uses 256), so --accumulate 4 there, 8 on 16-32 GB")
    h.add_argument("--lr", type=float, default=0.1, help="LR per 256 images (3.2 at 8192, Sec. 4.1), cosine")
    h.add_argument("--warmup-epochs", type=float, default=5, help="CHOICE (Goyal et al.)")
    h.add_argument("--weight-decay", type=float, default=1e-4, help="CHOICE (standard ResNet recipe)")
    h.add_argument("--crop-size", type=int, default=224, help="random-resized-crop side")
    h.add_argument("--crop-scale", type=float, default=0.08, help="smallest crop area fraction (ImageNet standard)")
    g = system(s, "runs/dap/cls")
    g.add_argument("--from-torchvision", action="store_true",
                   help="no training: save torchvision's original ImageNet weights (IMAGENET1K_V1, 76.1%% top-1 "
                        "for R50) as the classifier (IN-1M, Sec. 4.1)")
    g.add_argument("--weights", default="",
                   help="no training: save these weights instead ('torchvision:IMAGENET1K_V2', 'timm:<name>', a path)")

    # Step 2 ----------------------------------------------------------------------------------
    s = sub.add_parser("pseudo-boxes", help="Step 2: CAM pseudo boxes for every image")
    h = s.add_argument_group("paper (Sec. 3.1, 4.1)")
    h.add_argument("--scales", type=int, nargs="+", default=[288, 576], help="CAM short sides, Sec. 4.1")
    h.add_argument("--thresholds", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5], help="tau, Sec. 4.1")
    h.add_argument("--nms-iou", type=float, default=0.8, help="Sec. 4.1")
    h.add_argument("--box-variant", default="paper", choices=("paper", "released"),
                   help="Eq. (2-6) as written, or the released code's variant (DEVIATION)")
    g = system(s, "runs/dap/pseudo_boxes", trains=False)
    g.add_argument("--classifier", default="runs/dap/cls/classifier.pth", help="Step 1 checkpoint")
    g.add_argument("--split", default="train")
    g.add_argument("--batch-size", type=int, default=64, help="images per forward, per rank")
    g.add_argument("--chunk-size", type=int, default=10000, help="images per shard (resume unit)")
    g.add_argument("--coco-json", action="store_true", help="also write pseudo_boxes_coco.json (small sets)")

    # Step 3 ----------------------------------------------------------------------------------
    s = sub.add_parser("pretrain", help="Step 3: detector pre-training on the pseudo boxes")
    _detector_args(s, batch=32, warmup=2000, warmup_factor=0.01, scales=[96, 160, 320, 640], max_size=1333,
                   test_size=640, cite="IMPLEMENTATION_NOTES (released config), Sec. 4.1, 4.4",
                   schedule="faster_rcnn_fpn: 0.008 at batch 64, 1 epoch (released config); retinanet: 0.005 at "
                            "batch 32, 80,072 iterations (Sec. 4.4)")
    g = system(s, "runs/dap/det")
    g.add_argument("--pseudo-boxes", default="runs/dap/pseudo_boxes", help="Step 2 output folder (the pseudo-box table)")
    g.add_argument("--classifier", default="runs/dap/cls/classifier.pth", help="Step 1 checkpoint (backbone init)")
    g.add_argument("--split", default="train")
    g.add_argument("--freeze-backbone", action="store_true", help="Tab. 3: only FPN/RPN/heads learn")

    # Step 4 ----------------------------------------------------------------------------------
    s = sub.add_parser("finetune", help="Step 4: downstream fine-tuning from DAP or CLS weights")
    _detector_args(s, batch=16, warmup=500, warmup_factor=1 / 3, scales=None, max_size=None, test_size=None,
                   cite="Sec. 4.1", schedule="the --protocol's: voc 0.01 at batch 16, 14 epochs; coco 0.02 at "
                                             "batch 16 (retinanet 0.01), 90k iterations")
    h = s.add_argument_group("protocol")
    h.add_argument("--protocol", default="voc07", choices=tuple(PROTOCOLS),
                   help="voc: 14 epochs, LR 0.01, x0.1 at 10, short side 640 (max 1066); coco: 90k it., LR 0.02 "
                        "(RetinaNet 0.01), x0.1 at 60k and 80k, short side 800 (Sec. 4.1). voc0712: --data "
                        "VOC2007,VOC2012 roots (07+12 trainval, the k-shot pool of Fig. 4)")
    h.add_argument("--kshot", type=int, default=0,
                   help="k images per class, k x C in all (kshot_subset; 5/10/20/50/100, Fig. 3-4); 0 = all")
    h.add_argument("--milestones", type=float, nargs="*", default=None,
                   help="LR x0.1 points as fractions of training (default: the protocol's, voc 10/14, coco 60/90 "
                        "and 80/90)")
    g = system(s, "runs/dap/finetune")
    g.add_argument("--init", required=True, help="DAP detector (Step 3) or classifier (Step 1, the CLS baseline)")
    g.add_argument("--train-split", default=None, help="default: the protocol's")
    g.add_argument("--test-split", default=None, help="default: the protocol's")
    g.add_argument("--test-images", type=int, default=256, help="synthetic test images")
    g.add_argument("--eval-only", action="store_true")
    return p


def _detector_args(s, *, batch, warmup, warmup_factor, scales, max_size, test_size, cite, schedule):
    h = s.add_argument_group(f"paper ({cite})")
    h.add_argument("--arch", default="faster_rcnn_fpn", choices=("faster_rcnn_fpn", "retinanet"),
                   help="Faster R-CNN FPN; RetinaNet in Tab. 6-7")
    h.add_argument("--backbone", default="resnet50", help="ResNet-50 (101 in Tab. 4-5)")
    h.add_argument("--batch-size", type=int, default=batch, help="global batch")
    h.add_argument("--lr", type=float, default=None, help=f"LR at a global batch of --lr-batch (default: {schedule})")
    h.add_argument("--lr-batch", type=int, default=None, help="batch at which --lr is given (linear scaling)")
    h.add_argument("--epochs", type=float, default=None, help="passes over the data (default: as --lr)")
    h.add_argument("--iters", type=int, default=None, help="iterations instead of epochs (default: as --lr; "
                                                            "k-shot: the tuned early stop)")
    h.add_argument("--warmup-iters", type=int, default=warmup, help=f"linear warm-up (default {warmup})")
    h.add_argument("--warmup-factor", type=float, default=warmup_factor,
                   help=f"LR factor at the warm-up's start (default {warmup_factor:.3g})")
    h.add_argument("--weight-decay", type=float, default=1e-4, help="1e-4 (IN-1M), Sec. 4.1")
    protocol = "the protocol's: voc {}, coco {}"
    h.add_argument("--scales", type=int, nargs="+", default=scales,
                   help=f"training short sides (default {scales or protocol.format(640, 800)})")
    h.add_argument("--max-size", type=int, default=max_size,
                   help=f"longest side (default {max_size or protocol.format(1066, 1333)})")
    h.add_argument("--test-size", type=int, default=test_size,
                   help=f"test short side (default {test_size or protocol.format(640, 800)})")
    h.add_argument("--anchor-sizes", type=int, nargs="*", default=None, help="default: torchvision's 32..512")
    h.add_argument("--proposals", type=int, nargs=2, default=[2000, 1000], metavar=("TRAIN", "TEST"),
                   help="RPN proposals per image kept after NMS (maskrcnn-benchmark / torchvision defaults)")
    h.add_argument("--roi-batch", type=int, default=512, help="RoIs sampled per image for the box head")


# ============================================================================================
# Step 2 (Sec. 3.1): CAM -> pseudo boxes. Pure functions.
# ============================================================================================
def class_activation_maps(features: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor,
                          labels: torch.Tensor) -> torch.Tensor:
    """CAM of each image's labelled class: the FC row (weight and bias) as a 1x1 conv on the last
    feature map, no average pooling, no activation. features (B, C, h, w), fc_weight (K, C),
    fc_bias (K,), labels (B,) -> (B, h, w)."""
    w = fc_weight[labels]  # (B, C)
    return torch.einsum("bchw,bc->bhw", features, w) + fc_bias[labels][:, None, None]


def normalize_cam(cam: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. (1) on each map of cam (B, h, w) over its `valid` cells (B, h, w) bool; cells outside
    `valid` become 0. An all-equal map becomes all zeros."""
    if valid is None:
        valid = torch.ones_like(cam, dtype=torch.bool)
    lo = cam.masked_fill(~valid, float("inf")).amin(dim=(1, 2), keepdim=True)
    hi = cam.masked_fill(~valid, float("-inf")).amax(dim=(1, 2), keepdim=True)
    # Eq. (1)
    out = (cam - lo) / (hi - lo).clamp_min(torch.finfo(cam.dtype).tiny)
    return out.masked_fill(~valid, 0.0)


def threshold_cam(cam: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """Eq. (2): M = CAM * 1{CAM > tau}. A tensor of taus (T,) gives (T, *cam.shape)."""
    tau = torch.as_tensor(tau, dtype=cam.dtype, device=cam.device)
    cam = cam.expand(*tau.shape, *cam.shape)
    tau = tau.reshape(*tau.shape, *([1] * (cam.dim() - tau.dim())))
    # Eq. (2)
    return cam * (cam > tau)


_EIGHT_CONNECTED = np.zeros((3, 3, 3), bool)
_EIGHT_CONNECTED[1] = True  # 8-connected inside a map, never across the stacked maps
_FOUR_CONNECTED = ndimage.generate_binary_structure(3, 1) & _EIGHT_CONNECTED  # scipy's default, in a map


def moment_boxes(m: np.ndarray, x: np.ndarray, y: np.ndarray, comp: np.ndarray, n: int) -> np.ndarray:
    """Eq. (3-6) for n components at once: m, x, y are the weight and the pixel-centre coordinates
    of every pixel, comp its component (0..n-1). Returns (n, 4) float64 x_c, y_c, w, h."""
    s0 = np.bincount(comp, m, n)  # sum of M over the component (the denominators)
    # Eq. (3), Eq. (4): the M-weighted mean of x and of y
    x_c = np.bincount(comp, m * x, n) / s0
    y_c = np.bincount(comp, m * y, n) / s0
    # Eq. (5), Eq. (6): sqrt(12 x the M-weighted variance), the side of a uniform box of that variance
    w = np.sqrt(12.0 * np.bincount(comp, m * (x - x_c[comp]) ** 2, n) / s0)
    h = np.sqrt(12.0 * np.bincount(comp, m * (y - y_c[comp]) ** 2, n) / s0)
    return np.stack([x_c, y_c, w, h], 1)


def cams_to_boxes(cams: torch.Tensor, thresholds=(0.2, 0.3, 0.4, 0.5), nms_iou: float = 0.8,
                  sizes: torch.Tensor | None = None, variant: str = "paper"):
    """Pseudo boxes of a batch of raw CAMs (B, h, w); `sizes` (B, 2) gives each map's valid (h, w)
    when maps of different sizes are padded into one batch (top-left aligned).

    Returns (boxes (M, 4) float32 x1 y1 x2 y2 in CAM cells, image (M,) int64 index into the batch),
    grouped by image, larger boxes first. `variant="released"`: the released code's deviations
    (module docstring); it takes the maps as given (multiscale_cams' average of normalised maps).

    Batched: the B x T thresholded maps are stacked into one (B*T, h, w) array, labelled in one
    scipy call (components never cross maps), and every per-component sum of Eq. (3-6) is a
    bincount over the flat list of foreground pixels."""
    if variant not in ("paper", "released"):
        raise ValueError(f"unknown box variant {variant!r}; choose 'paper' or 'released'")
    device = cams.device
    cams = cams.detach().float().cpu()
    b, hh, ww = cams.shape
    if sizes is None:
        sizes = torch.tensor([[hh, ww]] * b)
    sizes = torch.as_tensor(sizes).reshape(b, 2)
    valid = (torch.arange(hh)[None, :, None] < sizes[:, :1, None]) & (torch.arange(ww)[None, None, :] < sizes[:, 1:, None])
    # Eq. (1) (the released code does not re-normalise the average of its normalised maps)
    cam = normalize_cam(cams, valid) if variant == "paper" else cams.masked_fill(~valid, 0.0)
    taus = torch.as_tensor(thresholds, dtype=torch.float32)
    t = len(taus)
    m_maps = threshold_cam(cam, taus).transpose(0, 1).reshape(b * t, hh, ww).numpy()  # (B*T, h, w): map k = (image k // T, tau k % T), Eq. (2)

    # connected components of every (image, tau) map in one call: lab holds 1..n, 0 = background
    lab, n = ndimage.label(m_maps > 0, structure=_EIGHT_CONNECTED if variant == "paper" else _FOUR_CONNECTED)
    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    if n == 0:
        return empty[0].to(device), empty[1].to(device)
    rect = ndimage.find_objects(lab)  # per component: (map, rows, columns) slices of its rectangle
    comp_map = np.array([r[0].start for r in rect], np.int64)  # (n,) which (image, tau) map it lies in
    if variant == "paper":
        # the pixels of Eq. (3-6): every foreground pixel, with its component and its M
        flat = np.flatnonzero(lab)
        comp = lab.ravel()[flat] - 1  # (P,) component of each foreground pixel, 0..n-1
        rem = flat % (hh * ww)  # position inside its map
        ys, xs = rem // ww, rem % ww
        weight = m_maps.ravel()[flat].astype(np.float64)  # M(x, y) of Eq. (2)
        area = np.bincount(comp, minlength=n).astype(np.float64)  # a component's area: its pixel count
    else:  # the released code: every thresholded pixel inside the component's rectangle, weight cam + 0.22
        comp, ys, xs, weight = [], [], [], []
        for c, (mp, rows, cols) in enumerate(rect):
            window = m_maps[mp.start, rows, cols]
            yy, xx = np.nonzero(window)
            comp.append(np.full(len(yy), c)), ys.append(yy + rows.start), xs.append(xx + cols.start)
            weight.append(window[yy, xx].astype(np.float64) + 0.22)
        comp, ys, xs, weight = (np.concatenate(v) for v in (comp, ys, xs, weight))
        area = np.array([(r[1].stop - r[1].start) * (r[2].stop - r[2].start) for r in rect], np.float64)
    x, y = xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5  # pixel centres (x = column + 0.5)

    # drop components smaller than half the largest of their map
    largest = np.zeros(b * t)
    np.maximum.at(largest, comp_map, area)
    keep = area >= 0.5 * largest[comp_map]
    if variant == "released":  # at most 4 components per threshold, largest first
        order = np.lexsort((-area, comp_map))  # by map, then by decreasing area
        rank = np.empty(n, np.int64)
        sorted_maps = comp_map[order]
        rank[order] = np.arange(n) - np.searchsorted(sorted_maps, sorted_maps, "left")  # place inside its map
        keep &= rank < 4

    xc, yc, w, h = moment_boxes(weight, x, y, comp, n).T  # Eq. (3-6), every component at once
    if variant == "released":
        w, h = np.maximum(w, 1.0), np.maximum(h, 1.0)
    image = comp_map // t
    lim_h, lim_w = sizes[image, 0].numpy(), sizes[image, 1].numpy()
    # the box centred on (x_c, y_c) with sides w, h, clipped to the map's valid cells
    boxes = np.stack([np.clip(xc - w / 2, 0, lim_w), np.clip(yc - h / 2, 0, lim_h),
                      np.clip(xc + w / 2, 0, lim_w), np.clip(yc + h / 2, 0, lim_h)], 1)
    keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, image = torch.from_numpy(boxes[keep]).float(), torch.from_numpy(image[keep])
    if len(boxes) == 0:
        return empty[0].to(device), empty[1].to(device)
    # merge the thresholds' boxes by NMS, scored by area (the larger box wins)
    score = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    kept = batched_nms(boxes.double(), score.double(), image, nms_iou)
    kept = kept[torch.argsort(image[kept], stable=True)]  # grouped by image, larger first
    return boxes[kept].to(device), image[kept].to(device)


def cam_to_boxes(cam: torch.Tensor, thresholds=(0.2, 0.3, 0.4, 0.5), nms_iou: float = 0.8,
                 variant: str = "paper") -> torch.Tensor:
    """Pseudo boxes (N, 4) x1 y1 x2 y2, in CAM pixel units, of one raw 2-D CAM (h, w): Eq. (1-6),
    one box per large connected component per threshold, merged by NMS at `nms_iou`."""
    if cam.dim() != 2:
        raise ValueError(f"cam_to_boxes takes one 2-D map (h, w), got shape {tuple(cam.shape)}")
    return cams_to_boxes(cam[None], thresholds, nms_iou, variant=variant)[0]


def resnet_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last ResNet stage (C5) of a torchvision ResNet classifier: (B, C, H/32, W/32)."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


@torch.no_grad()
def multiscale_cams(model, batches, labels: torch.Tensor):
    """CAMs averaged over scales and the horizontal flip (Sec. 4.1, released code).

    `batches`: one (images (B, 3, H, W) normalised and zero-padded to multiples of 32, grid (B, 2)
    valid C5 cells) per scale, smallest scale first. Each image goes through the network at its own
    size padded to a multiple of 32 (images of one size together), so its CAM does not depend on the
    other images of the batch. Each scale's CAM is the flip-averaged feature map's CAM, min-max
    normalised (Eq. 1) on its own; smaller scales are upsampled (nearest) to the
    largest scale's grid and the maps averaged. Returns (cams (B, h, w), grid (B, 2)) on the largest
    scale's grid."""
    fc_w, fc_b = model.fc.weight.float(), model.fc.bias.float()
    out_grid, total = batches[-1][1], None
    for images, grid in batches:
        cam = torch.zeros(len(images), int(grid[:, 0].max()), int(grid[:, 1].max()), device=images.device)
        # each image at its own size padded to a multiple of 32 (as released), never at the batch's
        # largest: the extra padding would reach its border cells through the receptive field
        for gh, gw in torch.unique(grid, dim=0).tolist():
            same = (grid == grid.new_tensor([gh, gw])).all(1).nonzero()[:, 0]
            x = images[same, :, : gh * STRIDE, : gw * STRIDE]
            f = resnet_features(model, x)
            f = 0.5 * (f + resnet_features(model, x.flip(-1)).flip(-1))  # flip averaged on the features
            cam[same, :gh, :gw] = normalize_cam(class_activation_maps(f.float(), fc_w, fc_b, labels[same]))  # Eq. (1)
        if total is None:
            total = torch.zeros(len(cam), int(out_grid[:, 0].max()), int(out_grid[:, 1].max()), device=cam.device)
        for i in range(len(cam)):  # nearest upsampling of each image's valid cells to its final grid
            gh, gw = int(out_grid[i, 0]), int(out_grid[i, 1])
            cell = cam[i, : int(grid[i, 0]), : int(grid[i, 1])]
            total[i, :gh, :gw] += F.interpolate(cell[None, None], size=(gh, gw), mode="nearest")[0, 0]
    return total / len(batches), out_grid


def box_quality(pred: list[torch.Tensor], true: list[torch.Tensor], iou: float = 0.5) -> dict:
    """CorLoc (images with a pseudo box at IoU >= iou with a true box) and recall (true boxes hit)."""
    hits, found, total = 0, 0, 0
    for p, g in zip(pred, true):
        total += len(g)
        if len(p) and len(g):
            m = box_iou(p.float(), g.float()) >= iou
            hits += bool(m.any())
            found += int(m.any(0).sum())
    return {"corloc": hits / max(len(pred), 1), "recall": found / max(total, 1),
            "boxes_per_image": sum(len(p) for p in pred) / max(len(pred), 1)}


# ============================================================================================
# Step 2 data: CAM inputs, and the pseudo-box table (flat arrays, memory-mapped)
# ============================================================================================
class CamInputs:
    """Collate for CAM extraction, run in the loader workers: each image resized to every short
    side in `scales`, normalised, zero-padded right/bottom to a multiple of 32 and to the batch's
    largest. Returns (per-scale [(images, grid)], labels, indices, sizes (B, 2) original h, w)."""

    def __init__(self, scales):
        self.scales = sorted(scales)
        self.mean, self.std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]

    def __call__(self, batch):
        indices, images, labels = zip(*[(i, img, lab) for i, (img, lab) in batch])
        sizes = torch.tensor([img.shape[-2:] for img in images])
        per_scale = []
        for s in self.scales:
            resized = []
            for img in images:
                h, w = img.shape[-2:]
                f = s / min(h, w)
                nh, nw = max(1, round(h * f)), max(1, round(w * f))
                # antialiased bilinear on the uint8 image (torchvision's SIMD kernel); float comes below
                resized.append(v2.functional.resize(img, [nh, nw], antialias=True))
            grid = torch.tensor([[math.ceil(x.shape[1] / STRIDE), math.ceil(x.shape[2] / STRIDE)] for x in resized])
            canvas = torch.zeros(len(resized), 3, int(grid[:, 0].max()) * STRIDE, int(grid[:, 1].max()) * STRIDE)
            for k, x in enumerate(resized):  # copied as float and normalised in place: no temporaries
                region = canvas[k, :, : x.shape[1], : x.shape[2]]
                region.copy_(x).div_(255).sub_(self.mean).div_(self.std)
            per_scale.append((canvas, grid))
        return per_scale, torch.tensor(labels), torch.tensor(indices), sizes


class _Indexed(Dataset):
    """(index, item) of a dataset's `indices`, so a shard knows its images."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        return i, self.dataset[i]


def pseudo_box_table(root) -> RaggedTable:
    """Step 2's output, a `common.table.RaggedTable` under `root`: per box, boxes float32 (M, 4)
    x1 y1 x2 y2 in image pixels and labels int64 (M,) (1..C); per image, image_ids int64 (index into
    the source data set), image_labels int64 (0..C-1) and sizes int32 (N, 2) original (h, w).
    Shards (the resume unit, one per --chunk-size images): shards/chunk_<c>.npz."""
    return RaggedTable(root, rows=("boxes", "labels"), images=("image_ids", "image_labels", "sizes"),
                       what="pseudo-box table", shard_prefix="chunk_",
                       hint=f"run `dap.py pseudo-boxes --out {root}` first, or let it finish")


class PseudoBoxDataset(Dataset):
    """Detection targets from a pseudo-box table over the images of a classification data set
    (`images[i] -> (uint8 image, label)`): item k is (image, {boxes, labels, image_id}).

    The table is memory-mapped in each process on first use and pickles without its arrays
    (`common.table`), so every data-loading worker shares the page cache instead of holding a copy."""

    def __init__(self, root, images, transforms=None):
        self.table, self.images, self.transforms = pseudo_box_table(root), images, transforms
        self.classes = tuple(self.table.meta["classes"])
        self._len = len(self.table)  # opens and checks the table here, in the main process

    def __len__(self):
        return self._len

    @property
    def image_ids(self):
        return self.table.arrays["image_ids"]

    def image_size(self, k: int) -> tuple[int, int]:
        h, w = self.table.arrays["sizes"][k]
        return int(h), int(w)

    def annotations(self, k: int) -> dict:
        return self.table[k]  # {"boxes", "labels"}

    def __getitem__(self, k: int):
        image, _ = self.images[int(self.image_ids[k])]
        ann = self.annotations(k)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(ann["boxes"]), format="XYXY",
                                                    canvas_size=tuple(image.shape[-2:])),
                  "labels": torch.from_numpy(ann["labels"]), "image_id": int(self.image_ids[k])}
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def export_coco_json(root, path=None) -> Path:
    """The pseudo-box table as a COCO JSON (small sets only: it is one Python object in memory).
    Image ids are source indices + 1; file names are the indices."""
    table = pseudo_box_table(root)
    arrays, meta = table.arrays, table.meta
    images, anns = [], []
    for k, (i, (h, w)) in enumerate(zip(arrays["image_ids"], arrays["sizes"])):
        images.append({"id": int(i) + 1, "file_name": f"{int(i)}", "height": int(h), "width": int(w)})
        for r in range(arrays["offsets"][k], arrays["offsets"][k + 1]):
            x1, y1, x2, y2 = (float(v) for v in arrays["boxes"][r])
            anns.append({"id": len(anns) + 1, "image_id": int(i) + 1, "category_id": int(arrays["labels"][r]),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": c + 1, "name": n} for c, n in enumerate(meta["classes"])]
    path = Path(path or Path(root) / "pseudo_boxes_coco.json")
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    os.replace(tmp, path)
    return path


# ============================================================================================
# Step 1: classifier pre-training (cross-entropy)
# ============================================================================================
def train_classifier(args, env) -> Path:
    seed_everything(args.seed)
    out = Path(args.out)
    final = out / "classifier.pth"
    if args.from_torchvision or args.weights:
        model = load_cam_classifier(args.backbone, "torchvision" if args.from_torchvision else args.weights)
        classes = [str(c) for c in range(model.fc.out_features)]
        if args.data != "synthetic" and Path(args.data, "train").is_dir():
            classes = build_classification_dataset(args.data, "train").classes
            if len(classes) != model.fc.out_features:
                raise ValueError(f"{args.data} has {len(classes)} classes, the weights' classifier (fc) "
                                 f"{model.fc.out_features}: Step 2's CAMs need the fc of the data's own classes")
        save_checkpoint(final, {"model": model.state_dict(), "args": vars(args), "classes": list(classes)})
        return final

    augment = v2.Compose([v2.RandomResizedCrop(args.crop_size, scale=(args.crop_scale, 1.0), antialias=True),
                          v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    train_set = build_classification_dataset(args.data, "train", augment,
                                             num_images=args.synthetic_images, image_size=args.image_size,
                                             seed=args.seed)
    model = build_classifier(args.backbone, len(train_set.classes)).to(env.device)
    # --batch-size is global: per rank and batch = batch / (world x accumulate), one update every
    # --accumulate batches; LR = args.lr x batch / 256 (linear scaling)
    if args.batch_size % (env.world_size * args.accumulate):
        raise ValueError(f"--batch-size {args.batch_size} does not split into {env.world_size} ranks x "
                         f"--accumulate {args.accumulate} equal batches")
    per_rank = args.batch_size // (env.world_size * args.accumulate)
    lr = args.lr * args.batch_size / 256
    loader = build_loader(train_set, per_rank, train=True, workers=args.workers, seed=args.seed,
                          collate_fn=collate_classification, group_by_aspect_ratio=False)
    per_epoch = math.ceil(len(loader) / args.accumulate)  # updates per epoch
    steps = args.epochs * per_epoch
    decay = [p for p in model.parameters() if p.ndim > 1]  # no weight decay on BN and biases
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, momentum=0.9)
    scheduler = build_scheduler(optimizer, steps, warmup_steps=int(args.warmup_epochs * per_epoch),
                                schedule="cosine")
    train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=args.epochs, out_dir=out, args=args,
                   loss_fn=classification_loss, amp=args.amp, desc="classify", accumulate=args.accumulate,
                   resume=resolve_resume(args.resume, out), checkpoint_every=args.checkpoint_every)
    save_checkpoint(final, {"model": model.state_dict(), "args": vars(args), "classes": list(train_set.classes)})
    if args.data == "synthetic" or Path(args.data, "val").is_dir():
        val = build_classification_dataset(args.data, "val", classification_transforms(False, args.crop_size),
                                           num_images=max(64, args.synthetic_images // 4), image_size=args.image_size,
                                           seed=args.seed)
        acc = classifier_accuracy(model, val, env.device, args.workers)
        JsonlLogger(out / "metrics.jsonl").log(val_top1=acc)
        if is_main():
            print(f"classifier top-1 on {args.data} val: {100 * acc:.1f}%")
    return final


def load_cam_classifier(backbone: str, weights) -> torch.nn.Module:
    """A classifier from given weights *with its fc*: Step 2's CAM is the fc row of the labelled
    class, so the fc must be the trained one (`load_weights` alone skips it as class-specific).
    `weights`: "torchvision[:NAME]", "timm:<name>" or a path; the class count is the fc's."""
    if is_torchvision(weights):
        return build_classifier(backbone, 1000, pretrained=weights)
    sd = read_state_dict(weights)
    if "fc.weight" not in sd:
        raise ValueError(f"--weights {weights}: no classifier layer fc.weight among its {len(sd)} tensors (a "
                         f"backbone or detector checkpoint?). Step 2's CAMs need a classifier's fc; give the "
                         f"weights of a whole classifier")
    model = build_classifier(backbone, sd["fc.weight"].shape[0])
    report = load_weights(model, sd, skip_class_specific=False)
    if report.skipped or report.missing:
        raise ValueError(f"--weights {weights} does not fit a {backbone} classifier: "
                         f"{', '.join(k for k, _ in report.skipped) or ', '.join(report.missing[:5])} not loaded "
                         f"(another --backbone?)")
    return model


@torch.no_grad()
def classifier_accuracy(model, dataset, device, workers: int = 0) -> float:
    """Top-1 accuracy of `model` on a classification data set (this rank's shard, averaged over ranks)."""
    loader = build_loader(dataset, 64, train=False, workers=workers, collate_fn=None)
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    s = reduce_dict({"correct": correct, "total": total}, average=False)
    return s["correct"] / max(s["total"], 1)


def collate_classification(batch):
    """(list of images, list of {"label"}): the shared loop's (images, targets) shape."""
    return [img for img, _ in batch], [{"label": torch.tensor(lab)} for _, lab in batch]


def classification_loss(model, images, targets) -> dict:
    """Step 1's objective: cross-entropy on the image-level labels."""
    logits = model(torch.stack(images))
    return {"loss_ce": F.cross_entropy(logits, torch.stack([t["label"] for t in targets]))}


# ============================================================================================
# Step 2: pseudo-box generation, batched, split across ranks by chunk, resumable
# ============================================================================================
def load_classifier(path, device) -> tuple[torch.nn.Module, list]:
    ck = load_checkpoint(path)
    classes = ck.get("classes")
    backbone = ck.get("args", {}).get("backbone", "resnet50")
    num = ck["model"]["fc.weight"].shape[0]
    model = build_classifier(backbone, num)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), list(classes or range(num))


def generate_pseudo_boxes(args, env) -> Path:
    seed_everything(args.seed)
    out = Path(args.out)
    table = pseudo_box_table(out)
    if table.complete:
        if is_main():
            print(f"pseudo boxes already complete in {out}")
        return out
    images = build_classification_dataset(args.data, args.split, num_images=args.synthetic_images,
                                          image_size=args.image_size, seed=args.seed)
    model, classes = load_classifier(args.classifier, env.device)
    if len(classes) != len(images.classes):
        raise ValueError(f"classifier has {len(classes)} classes, the data set {len(images.classes)}")
    n = len(images)
    chunks = math.ceil(n / args.chunk_size)
    collate = CamInputs(args.scales)
    t0, done = time.time(), 0
    for c in range(env.rank, chunks, env.world_size):  # chunk c belongs to rank c % world
        if table.shard_path(c).is_file():
            continue  # resume: finished shards are kept
        idx = np.arange(c * args.chunk_size, min(n, (c + 1) * args.chunk_size))
        loader = DataLoader(_Indexed(images, idx), batch_size=args.batch_size, num_workers=args.workers,
                            collate_fn=collate)
        rows = {k: [] for k in ("boxes", "labels", "counts", "image_ids", "image_labels", "sizes")}
        for per_scale, labels, indices, sizes in loader:
            per_scale = [(x.to(env.device, non_blocking=True), g.to(env.device)) for x, g in per_scale]
            with autocast(env.device, args.amp):
                cams, grid = multiscale_cams(model, per_scale, labels.to(env.device))
            boxes, image = cams_to_boxes(cams, args.thresholds, args.nms_iou, sizes=grid, variant=args.box_variant)
            boxes, image = boxes.cpu(), image.cpu()
            # CAM cells -> pixels of the largest scale (stride) -> original pixels (resize factor)
            factor = max(args.scales) / sizes.min(1).values.float()
            boxes = boxes * STRIDE / factor[image, None]
            hw = sizes[image].float()
            boxes = torch.minimum(boxes, hw[:, [1, 0, 1, 0]])
            rows["boxes"].append(boxes.numpy().astype(np.float32))
            rows["labels"].append((labels[image] + 1).numpy())
            rows["counts"].append(np.bincount(image.numpy(), minlength=len(labels)))
            rows["image_ids"].append(indices.numpy())
            rows["image_labels"].append(labels.numpy())
            rows["sizes"].append(sizes.numpy().astype(np.int32))
            done += len(labels)
        table.write_shard(c, **{k: np.concatenate(v) for k, v in rows.items()})  # atomic: no half shard
        print(f"[rank {env.rank}] chunk {c + 1}/{chunks}: {done} images, {done / (time.time() - t0):.1f} img/s",
              flush=True)
    if not is_main():
        return out
    # rank 0 merges once every rank's shards exist; it polls (a collective could time out)
    while table.missing_shards(chunks):
        time.sleep(5)
    meta = {"classes": list(images.classes), "data": args.data, "split": args.split, "classifier": str(args.classifier),
            "scales": args.scales, "thresholds": args.thresholds, "nms_iou": args.nms_iou,
            "box_variant": args.box_variant}
    table.merge_shards(chunks, meta, keep_shards=True)
    print(f"pseudo boxes: {table.meta['num_boxes']} boxes on {len(table)} images -> {out}")
    if args.coco_json:
        print(f"COCO JSON: {export_coco_json(out)}")
    if args.data == "synthetic":  # the truth is known: report pseudo-box quality
        q = pseudo_box_quality(out, images.dataset)
        print(f"pseudo-box quality: CorLoc {q['corloc']:.3f}, recall {q['recall']:.3f}, "
              f"{q['boxes_per_image']:.2f} boxes per image")
        (out / "quality.json").write_text(json.dumps(q))
    return out


def pseudo_box_quality(root, truth) -> dict:
    """CorLoc and recall of a pseudo-box table against `truth.annotations(i)` (same image order)."""
    table = pseudo_box_table(root)
    pred, true = [], []
    for k, i in enumerate(table.arrays["image_ids"]):
        ann = truth.annotations(int(i))
        cls = table.arrays["image_labels"][k] + 1
        pred.append(torch.from_numpy(table[k]["boxes"]))
        true.append(torch.from_numpy(ann["boxes"][ann["labels"] == cls]))
    return box_quality(pred, true)


# ============================================================================================
# Step 3: detector pre-training on pseudo boxes;  Step 4: fine-tuning
# ============================================================================================
def _detector_loop(args, env, model, train_set, out, milestones_frac, iters=0):
    """SGD on a detection set with the shared engine. `--batch-size` is global; per rank = batch /
    world; LR = args.lr x batch / args.lr_batch (linear scaling)."""
    per_rank = max(1, args.batch_size // env.world_size)
    lr = args.lr * args.batch_size / args.lr_batch
    loader = build_loader(train_set, per_rank, train=True, workers=args.workers, seed=args.seed)
    epochs = math.ceil(iters / len(loader)) if iters else math.ceil(args.epochs)
    steps = iters or int(round(args.epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, steps, warmup_steps=min(args.warmup_iters, steps // 2),
                                warmup_factor=args.warmup_factor, schedule="step",
                                milestones=[int(f * steps) for f in milestones_frac])
    return train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=epochs, max_steps=steps,
                          out_dir=out, args=args, amp=args.amp, clip_grad=args.clip_grad,
                          resume=resolve_resume(args.resume, out), checkpoint_every=args.checkpoint_every,
                          desc=args.command)


def make_detector(args, num_classes: int, pretrained, trainable_layers: int = 3):
    """Faster R-CNN FPN (or RetinaNet) with frozen BN; `pretrained` is a classifier or detector checkpoint."""
    kw = {}
    if args.arch == "faster_rcnn_fpn":
        kw = dict(rpn_pre_nms_top_n_train=args.proposals[0], rpn_post_nms_top_n_train=args.proposals[0],
                  rpn_pre_nms_top_n_test=args.proposals[1], rpn_post_nms_top_n_test=args.proposals[1],
                  box_batch_size_per_image=args.roi_batch)
    return build_detector(args.arch, num_classes, args.backbone, norm="frozen_bn", trainable_layers=trainable_layers,
                          min_size=args.test_size, max_size=args.max_size, pretrained=pretrained,
                          anchor_sizes=args.anchor_sizes, **kw)


def pretrain_detector(args, env) -> Path:
    seed_everything(args.seed)  # same initial weights on every rank
    args, out = apply_pretrain_schedule(args), Path(args.out)
    images = build_classification_dataset(args.data, args.split, num_images=args.synthetic_images,
                                          image_size=args.image_size, seed=args.seed)
    train_set = PseudoBoxDataset(args.pseudo_boxes, images, detection_transforms(True, args.scales, args.max_size))
    # backbone from Step 1; FPN, RPN and heads random (Sec. 3.1). Stem + res2 frozen as in
    # maskrcnn-benchmark; --freeze-backbone freezes the whole ResNet (Tab. 3).
    model = make_detector(args, len(train_set.classes), args.classifier, 0 if args.freeze_backbone else 3)
    _detector_loop(args, env, model.to(env.device), train_set, out, milestones_frac=(2 / 3, 8 / 9), iters=args.iters)
    return out / "checkpoint.pth"


def finetune_detector(args, env) -> dict:
    seed_everything(args.seed)
    args, out = apply_protocol(args), Path(args.out)
    if args.kshot and args.protocol.startswith("voc") and args.data != "synthetic" and "," not in args.data:
        raise ValueError(f"--kshot {args.kshot} on VOC draws from VOC 07+12 trainval (Fig. 4): give --protocol "
                         f"voc0712 --data VOCdevkit/VOC2007,VOCdevkit/VOC2012, not --data {args.data} alone")
    train_set = build_detection_dataset(args.data, args.train_split, detection_transforms(True, args.scales, args.max_size),
                                        num_images=args.synthetic_images, image_size=args.image_size, seed=args.seed,
                                        train=True)
    test_data = args.data.split(",")[0]  # VOC07+12 trains on both, tests on VOC2007 test
    test_set = build_detection_dataset(test_data, args.test_split, detection_transforms(False),
                                       num_images=args.test_images, image_size=args.image_size, seed=args.seed)
    if args.kshot:
        split_file = out / f"kshot{args.kshot}_seed{args.seed}.json"
        if split_file.is_file():
            ids = load_split(split_file)["train"]
        else:
            ids = kshot_subset(train_set, args.kshot, seed=args.seed)
            if is_main():
                save_split(split_file, {"train": ids})
        train_set = subset_by_ids(train_set, ids)
    if args.eval_only:  # a fine-tuned detector is evaluated as it is, its box predictor included
        model = make_detector(args, len(train_set.classes), None)
        report = load_weights(model, args.init, skip_class_specific=False, verbose=False)
        if report.missing or report.skipped:
            raise ValueError(f"--eval-only --init {args.init}: not a fine-tuned detector of this --arch / --backbone / "
                             f"class set ({len(report.missing)} tensors missing, e.g. {report.missing[:3]}; "
                             f"{len(report.skipped)} of another shape, e.g. {[k for k, _ in report.skipped[:3]]}). "
                             f"Evaluate the checkpoint.pth a finetune run wrote")
        model = model.to(env.device)
    else:
        # the new detector takes every DAP weight except the class-specific last layers, or the
        # classifier's backbone (CLS); frozen BN and frozen stem + first block (Sec. 4.1)
        model = make_detector(args, len(train_set.classes), args.init).to(env.device)
        model = unwrap(_detector_loop(args, env, model, train_set, out, args.milestones, iters=args.iters))
    loader = build_loader(test_set, 1 if env.device.type == "cpu" else 4, train=False, workers=args.workers)
    metrics = evaluate_detector(model, loader, env.device, metric="coco" if args.protocol == "coco" else "voc07")
    if is_main():
        (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# ============================================================================================
# Demo: the four steps on the synthetic benchmark at the shared CPU recipe, CLS vs DAP at 5-shot
# ============================================================================================
DEMO = {  # `--demo` at the recipe of common.demo (ResNet-18, 64-px images); tests shrink it
    "object_images": 800,     # Step 1: the "ImageNet" (object-centric, one labelled class each)
    "pseudo_box_images": 500,  # Steps 2-3: its first 500 images (Step 3 sees each about 5 times)
    "object_test": 400,       # held-out object images: the classifier's top-1
    "scenes": 400,            # Step 4 draws its 5-shot subset (5 images per class, 40) from these
    "test_scenes": 300,       # held-out scenes: AP / AP50 of both fine-tunings
    "kshot": 5,
    "classifier_steps": 300,  # the benchmark's classifier reaches >= 0.85 top-1 at 300-400 steps
    "cam_scales": [96, 192],  # 1.5x and 3x the 64-px images (the paper: 288 / 576 on ~400-px images)
    "pretrain_steps": 300,    # Step 3 gets 3x one fine-tuning's budget (the paper: about 9x)
    "finetune_steps": 100,    # each of CLS and DAP, same 5-shot subset, same seed
    "zoom_out": 2.5,          # Step 3 canvas up to 2.5x the image (multi-scale, see demo())
    "batch_size": None,       # None: the recipe's (32 images a classifier step, 8 a detector step)
    "cache": "runs/synthetic_cache",
}


def demo(args) -> dict:
    """Steps 1-4 on the synthetic benchmark (`common.synthetic`, easy rendering) at the shared
    recipe (`common.demo`): ResNet-18 classifier (Step 1, top-1 on held-out images), CAM pseudo
    boxes with this script's Step 2 (`generate_pseudo_boxes`, scored against the kept-aside true
    boxes: CorLoc, recall, boxes per image), Faster R-CNN R18-FPN pre-trained on them (Step 3), then
    CLS (Step 1's backbone) and DAP (Step 3's whole detector but the class-specific predictor)
    fine-tuned on the same true 5-shot subset with the same steps and seed, and scored on held-out
    scenes (COCO AP50 and AP). Writes OUT/demo.json with the claims "DAP > CLS at 5-shot".

    DEMO (not the paper): Step 3 draws each image onto a canvas of 1-2.5x its side
    (`RandomZoomOut`, then resized back to 64 px): at 64 px this is what the paper's short sides
    96-640 do, it shows the detector objects of the scenes' sizes (13-35 px) besides the object
    images' 35-55 px. The recipe's AdamW / one-cycle replaces SGD in Steps 1, 3 and 4."""
    from common.demo import (DEMO_RECIPE, build_demo_detector, claim, evaluate_demo_classifier,
                             evaluate_demo_detector, train_demo_classifier, train_demo_detector, write_demo_result)

    t0, seed, out = time.perf_counter(), args.seed, Path(args.out)
    if out.exists() and any(out.iterdir()) and args.resume != "auto":
        raise FileExistsError(f"{out} holds an earlier demo: give a fresh --out, or --resume auto to reuse its "
                              f"finished steps")
    out.mkdir(parents=True, exist_ok=True)
    env = init_distributed("cpu")
    d, size, classes = DEMO, DEMO_RECIPE["object_size"], len(SyntheticDetection.classes)
    kw = dict(image_size=size, seed=seed, cache=d["cache"])
    tables = {"settings": {k: v for k, v in d.items() if k != "cache"}}

    def log(what):
        print(f"[demo {time.perf_counter() - t0:.0f} s] {what}", flush=True)

    # Step 1: the classifier (its checkpoint is what `dap.py classify` writes)
    objects = build_classification_dataset("synthetic", "train", num_images=d["object_images"], **kw)
    cls_path = out / "cls" / "classifier.pth"
    torch.manual_seed(seed)
    classifier = build_classifier(DEMO_RECIPE["backbone"], classes, norm=DEMO_RECIPE["norm"])
    if cls_path.is_file():
        classifier.load_state_dict(load_checkpoint(cls_path)["model"])
    else:
        train_demo_classifier(classifier, objects, d["classifier_steps"], seed=seed, batch_size=d["batch_size"])
        save_checkpoint(cls_path, {"model": classifier.state_dict(), "classes": list(objects.classes),
                                   "args": {"backbone": DEMO_RECIPE["backbone"]}})
    held_out = build_classification_dataset("synthetic", "val", num_images=d["object_test"], **kw)
    tables["classifier"] = {"top1": evaluate_demo_classifier(classifier, held_out), "steps": d["classifier_steps"],
                            "held_out_images": d["object_test"]}
    log(f"Step 1: classifier top-1 {tables['classifier']['top1']:.3f} on {d['object_test']} held-out images")

    # Step 2: pseudo boxes of every training image, by the CLI's own code path
    boxes = generate_pseudo_boxes(get_args_parser().parse_args([
        "pseudo-boxes", "--data", "synthetic", "--synthetic-images", str(d["pseudo_box_images"]),
        "--image-size", str(size), "--seed", str(seed), "--device", "cpu", "--workers", "0",
        "--classifier", str(cls_path), "--scales", *map(str, d["cam_scales"]), "--out", str(out / "pseudo_boxes")]), env)
    tables["pseudo_boxes"] = json.loads((boxes / "quality.json").read_text())
    log("Step 2: pseudo boxes, " + ", ".join(f"{k} {v:.3f}" for k, v in tables["pseudo_boxes"].items()))

    # Step 3: the whole detector pre-trained on the pseudo boxes, backbone from Step 1
    zoom = v2.RandomZoomOut(fill=[round(255 * m) for m in MEAN], side_range=(1.0, d["zoom_out"]), p=1.0)
    pseudo = PseudoBoxDataset(boxes, objects, transforms=zoom)
    det_path = out / "det" / "detector.pth"
    torch.manual_seed(seed)
    detector = build_demo_detector(classes, pretrained=classifier.state_dict())
    if det_path.is_file():
        detector.load_state_dict(load_checkpoint(det_path)["model"])
    else:
        train_demo_detector(detector, pseudo, d["pretrain_steps"], seed=seed, batch_size=d["batch_size"])
        save_checkpoint(det_path, {"model": detector.state_dict(), "classes": list(pseudo.classes)})
    log(f"Step 3: detector pre-trained, {d['pretrain_steps']} steps on {len(pseudo)} images")

    # Step 4: CLS vs DAP on the same true 5-shot subset, same steps and seed
    scenes = build_detection_dataset("synthetic", "train", num_images=d["scenes"], **kw)
    test = build_detection_dataset("synthetic", "test", num_images=d["test_scenes"], **kw)
    subset = subset_by_ids(scenes, kshot_subset(scenes, d["kshot"], seed=seed))
    rows = {}
    for name, init in (("CLS", classifier.state_dict()), ("DAP", detector.state_dict())):
        torch.manual_seed(seed)
        model = build_demo_detector(classes, pretrained=init)  # every tensor but the class-specific predictor
        wall = train_demo_detector(model, subset, d["finetune_steps"], seed=seed, batch_size=d["batch_size"])
        m = evaluate_demo_detector(model, test)
        rows[name] = {"AP50": m["AP50"], "AP": m["AP"], "AP75": m["AP75"], "train_s": round(wall, 1)}
        log(f"Step 4: {name} {d['kshot']}-shot: AP50 {m['AP50']:.3f}, AP {m['AP']:.3f}")
    tables["finetune"] = {"kshot_images": len(subset), "test_scenes": d["test_scenes"], **rows}
    claims = [claim(f"DAP > CLS at {d['kshot']}-shot", metric, ("DAP", rows["DAP"][metric]), ("CLS", rows["CLS"][metric]))
              for metric in ("AP50", "AP")]
    write_demo_result(out, "dap.py", seed, time.perf_counter() - t0, claims, tables)
    return tables


# ============================================================================================
# main
# ============================================================================================
def main(args) -> None:
    if args.demo:
        demo(args)
        return
    if args.command is None:
        get_args_parser().print_help()
        sys.exit(2)
    env = init_distributed(args.device)
    try:
        if args.command == "classify":
            print(train_classifier(args, env))
        elif args.command == "pseudo-boxes":
            generate_pseudo_boxes(args, env)
        elif args.command == "pretrain":
            pretrain_detector(args, env)
        elif args.command == "finetune":
            m = finetune_detector(args, env)
            if is_main():
                print(json.dumps(m, indent=1))
    finally:
        cleanup()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
