"""Learning from Noisy Anchors for One-stage Object Detection (Li et al., CVPR 2020).

Paper: https://arxiv.org/abs/1912.05086, also Chapter 2 of Hengduo Li's thesis
(`../shared/papers/li_thesis_noisy_anchor_ssod_analysis.txt`, Sec. 2.4, Eq. 2.1-2.6, Algorithm 1).

RetinaNet's anchors are labelled by fixed IoU thresholds, so some positives hold clutter and some
negatives hold useful parts of objects. NoisyAnchor takes each ground truth's top-N anchors as
candidate positives (A_pos, everything else negative) and scores each candidate's cleanliness c
from what the network already predicts: the IoU of its regressed box with its ground truth (loc_a)
and its probability of the ground-truth class (cls_c). c replaces the hard label (soft labels), and
r, a non-linear function of the same two numbers normalised to mean 1, re-weights the positives'
classification and regression losses. Nothing changes at test time.

Equations -> code
- Eq. 2.1  focal-weighted BCE(p, t)          -> `focal_bce` (w_p = alpha_f (1-p)^gamma_f, w_n = (1-alpha_f) p^gamma_f);
                                                with a soft t: `soft_focal_loss` (--soft-focal)
- Eq. 2.2  IoU-threshold labels (baseline)    -> torchvision's `Matcher` (RetinaNet 0.5 / 0.4, RPN 0.7 / 0.3)
- Alg. 1 lines 1-6  A_pos = top-N per GT      -> `topn_assign` (used through `TopNMatcher`)
- Eq. 2.3  c = alpha loc_a + (1-alpha) cls_c  -> `cleanliness`; loc_a from `paired_iou` of the decoded box
- Eq. 2.4  r = (alpha f(loc_a) + (1-alpha) f(cls_c))^gamma, mean 1 -> `reweight`
- Eq. 2.5  L_cls = sum_pos r BCE(p, c) + sum_neg BCE(p, 0) -> `noisy_anchor_losses` (RetinaNet),
                                                             `NoisyAnchorRPN.compute_loss` (RPN)
- Eq. 2.6  L_reg = sum_pos r smoothL1           -> the same two functions
- Table 2.5 proposal AR@100/300/1000            -> `proposal_recall`
- Table 2.7 top-2 % confidence / IoU, Pearson r -> `confidence_iou_stats`
- Fig. 2.2  precision-recall curves             -> `pr_curves`, `plot_pr_curves`

CHOICE: both RetinaNet losses are normalised per image by |A_pos| of that image and averaged over the
  images (torchvision's RetinaNet normalisation); r is normalised to mean 1 over each image's
  positives, so that the r-weighted sums keep the same scale. With soft labels the normaliser is
  still the count |A_pos|, not the sum of c.
CHOICE: Eq. 2.1 with a soft target c (the text writes it for t in {0, 1} and leaves the soft form
  open): GFL's Quality Focal Loss, |c - p|^gamma_f BCE(p, c) without alpha (`--soft-focal qfl`, the
  default), the focal weighting whose per-element minimum is p* = c, as plain BCE's is: the soft
  label is then the confidence the positive is asked for, which is what Table 2.7 reports
  (confidences 0.78-0.92). Eq. 2.1 read literally, -c alpha_f (1-p)^gamma_f log p
  - (1-c)(1-alpha_f) p^gamma_f log(1-p) (`--soft-focal literal`, RetinaNet's alpha_f 0.25 and
  gamma_f 2), has its minimum far below c (c = 0.3 / 0.5 / 0.7 / 0.9 -> p* = 0.33 / 0.40 / 0.48 /
  0.60; Table 2.7's confidences lie above 0.60); torchvision's op on soft targets (`--soft-focal
  blended`: alpha_t (1-p_t)^gamma BCE, p_t = p c + (1-p)(1-c)) pushes it away from 0.5 (p* = 0.12 /
  0.50 / 0.88 / 0.99). Hard labels (the baseline, `--no-soft-labels`) always get the plain focal
  loss, Eq. 2.1 with alpha_f 0.25 / gamma_f 2 (= torchvision's `sigmoid_focal_loss`), whatever
  `--soft-focal` says. Measured in the demo (results/noisy_anchor.md, 400-step warm-up + 300 steps
  per arm at peak LR 3e-4, seeds 0-7): QFL beats the baseline at 8 of 8 seeds on AP and AP75 (15.5
  vs 13.9 AP, 11.4 vs 10.0 AP75, with Table 2.7's higher IoU and Pearson r at a milder
  confidence); the literal form (14.8 AP) and blended (14.7) beat it at AP at every seed too, and
  QFL is the best of the three at every seed. The choice rests on the minimum at p = c, not on
  these counts.
CHOICE: multi-class sigmoid: a positive's soft label c sits on its ground-truth class column, every
  other column is 0; r multiplies the anchor's whole row (all classes) and its regression loss.
CHOICE: f(x) = 1 / (1 - x) is evaluated on loc_a and cls_c clamped to at most 1 - 1e-3 (f <= 1000)
  so that r stays finite; c uses the unclamped values. c and r are detached (targets and weights).
CHOICE: when an anchor is in the top-N of several ground truths it goes to the one with the higher
  IoU (ties: the lower ground-truth index); top-N anchors are taken over all pyramid levels at once
  and are kept even at IoU 0 (Algorithm 1 has no IoU floor); an image without boxes has no A_pos.
CHOICE: regression is smooth L1 with beta 0.11 on torchvision's (1, 1, 1, 1) box deltas (the
  RetinaNet of Detectron / maskrcnn-benchmark; torchvision's own RetinaNet uses plain L1, which is
  `--smooth-l1-beta 0`). The baseline runs through the same loss code with the IoU matcher and
  soft labels / re-weighting off, so the two models differ only where the method differs.
CHOICE: RPN (Tables 2.5-2.6): A_pos / A_neg by top-N, then torchvision's balanced sampler (256
  anchors per image, at most half positive) as in any RPN; plain BCE (the RPN has no focal loss);
  r normalised over each image's sampled positives; both RPN terms divided by the number of sampled
  anchors (torchvision). Only the RPN changes; the Fast R-CNN head trains as usual (Table 2.6).
CHOICE: proposal AR = mean over IoU 0.5:0.05:0.95 of the recall of all (non-crowd) ground truths,
  class-agnostic, by the first k proposals in score order, with greedy one-to-one matching on
  `torchvision.ops.box_iou` (the proposal evaluation of Detectron / maskrcnn-benchmark).
CHOICE: Table 2.7's "before NMS" predictions are every candidate that enters the detector's NMS
  (score > 0.05, top 1000 per level for RetinaNet); "after NMS" are the final detections
  (torchvision's caps: 300 per image for RetinaNet, 100 for Faster R-CNN). The top 2 % by
  confidence are pooled over the whole evaluation set; a prediction's IoU is its best IoU with a
  ground truth of its predicted class (0 when none). The validation set is predicted once: `OnePass`
  returns the candidates (and a Faster R-CNN's proposals), gathered on rank 0 only, and the detector's
  own NMS and cap are applied to them afterwards (`after_nms`, the same output as the model's).
CHOICE: LR warm-up of 500 iterations from 1/3 (Detectron's RetinaNet; the paper is silent).
CHOICE: `--batch-size` is the global batch and must divide over the processes. The schedule follows
  it as Detectron2's reference world size does: LR x B/8, the 1x (180k) or 1.5x (270k, Table 2.1)
  iterations, the LR drops (2/3 and 8/9 of them) and the warm-up x 8/B (`schedule`); `--iters N`
  runs exactly N iterations.
CHOICE: Table 2.5 as the paper does it: the RPN trained alone first (`--rpn-only`: the box head
  frozen and out of the loss); Table 2.6 is the end-to-end run without it.
CHOICE: a VOC validation set is scored as Detectron2's PascalVOCDetectionEvaluator does (devkit AP,
  difficult objects ignored, the 11-point metric on VOC2007, AP the mean over IoU 0.50:0.95;
  `common.evaluation`), COCO by COCOeval; APs / APm / APl exist on COCO only.
DEVIATION: none in the method. The CPU demo (`demo`) runs common.demo's recipe (AdamW, one-cycle LR,
  64 px synthetic scenes, ResNet-18 with trainable BN, anchors 16-256 on P3-P7) with two convs per
  head branch instead of RetinaNet's four (half the head's cost on a CPU). Its backbone starts from
  `common.demo.imagenet_standin` (the demo classifier, 400 steps on object-centric images) where the
  paper, following RetinaNet's protocol (Sec. 2.5.1), starts from ImageNet weights: from random init both arms stayed near 2 AP and the claim was inside
  the seed noise (results/noisy_anchor.md). N is scaled to
  the anchors an object gets there: N = 30 x (mean anchors with IoU >= 0.5 per box in the demo's
  training scenes, ~6.2) / (the same for COCO's size mix at 800 px, 16.4; `COCO_ANCHORS_PER_GT`)
  = 11. Both arms start from one shared warm-up of the baseline, so that cls_c and loc_a mean
  something (the paper starts from ImageNet weights), then train the same further steps on the same
  batches, at a peak LR of 3e-4 (`--demo-arm-lr`; the warm-up's is the recipe's 1e-3). Restarting
  at 1e-3 re-randomises what the warm-up predicts, the very predictions cls_c and loc_a are read
  from: there, over three batch orders at seeds 2 and 3, the order alone moved an arm's AP by up
  to 2.6 (std 0.5-1.5) and NoisyAnchor's gain was +0.0 +- 1.1 AP; at 3e-4 the orders agree within
  0.6 AP (std <= 0.3), the gain is +1.0 to +1.9 AP in all six pairs, and the baseline is on average
  no worse than at 1e-3 (seeds 3 / 2: 15.2 / 13.6 vs 15.8 / 12.7 AP; results/noisy_anchor.md).
CHOICE: multi-scale testing (Table 2.1, `--test-scales 400 500 600 700 900 1000 1100 1200 --test-flip`)
  as Detectron's bbox test augmentation with its union heuristic: the candidates of the test scale
  (--min-size 800), of each extra short side and of every horizontal flip are pooled, then one NMS
  and the per-image cap; the long-side cap scales with the short side (1333 / 800).
NOT IMPLEMENTED (Table 2.1): a COCO test-dev results writer (detections_test-dev2017_*_results.json for
  the evaluation server; common's COCO loader also refuses an image-info file without annotations);
  AP on a labelled split is what this script reports.

Full scale (COCO trainval35k / minival, 1x schedule of Sec. 2.5.1, global batch 8 on 4+ GPUs):
  torchrun --nproc_per_node 4 noisy_anchor.py --data /data/coco --train-split train2017 \
      --val-split val2017 --pretrained torchvision --output-dir runs/noisy_anchor_r50
  baseline:  add --baseline (IoU 0.5 / 0.4 labels, hard labels, no re-weighting)
  Table 2.3: --no-soft-labels / --no-reweight;  Table 2.4: --gamma, --topn, --alpha
  Table 2.2: --backbone resnet101 | resnext101_32x8d;  multi-scale: --train-scales 640 672 704 736 768 800
  Table 2.1: --schedule 1.5x --train-scales 640 672 704 736 768 800, multi-scale testing with
      --test-scales 400 500 600 700 900 1000 1100 1200 --test-flip
  Tables 2.5-2.6 (RPN of Faster R-CNN FPN, LR 0.01 by default): --arch faster_rcnn_fpn (Table 2.5: add --rpn-only)
      (RPN baseline: --baseline; RPN-0.5: --baseline --iou-thresholds 0.5 0.5; RPN-0.5 + SR: --assign iou
       --iou-thresholds 0.5 0.5 --no-soft-labels)
  Fig. 2.2 from two finished runs: python noisy_anchor.py --plot-pr runs/baseline runs/noisy_anchor_r50
CPU demo (RetinaNet R18-FPN baseline vs NoisyAnchor on the synthetic benchmark, writes OUT/demo.json):
  python noisy_anchor.py --demo --seed 0 --out runs/noisy_anchor_demo
  python -m common.demo --script noisy_anchor.py --seeds 0 1 2   (the table in results/noisy_anchor.md)
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import batched_nms, box_area, box_iou, sigmoid_focal_loss

from common.data import build_detection_dataset, build_loader, detection_transforms
from common.detectors import build_detector
from common.distributed import barrier, cleanup, init_distributed, is_main, seed_everything, unwrap, wrap_ddp
from common.engine import build_scheduler, resolve_resume, train_detector
from common.evaluation import coco_precision, evaluate_predictions, evaluation_metric, format_ap, predict

EPS = 1e-3  # f(x) = 1 / (1 - x) is evaluated at x <= 1 - EPS (CHOICE above)
AR_IOUS = torch.linspace(0.5, 0.95, 10)  # COCO's AR thresholds


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("NoisyAnchor: learning from noisy anchors", add_help=True)
    paper = p.add_argument_group("paper hyper-parameters (defaults: Sec. 2.5.1 and Table 2.4)")
    paper.add_argument("--arch", default="retinanet", choices=["retinanet", "faster_rcnn_fpn"],
                       help="RetinaNet (Tables 2.1-2.4) or Faster R-CNN FPN with NoisyAnchor in its RPN (2.5-2.6)")
    paper.add_argument("--assign", default="topn", choices=["topn", "iou"],
                       help="A_pos: top-N anchors per GT (Alg. 1) or the IoU thresholds of Eq. 2.2")
    paper.add_argument("--topn", type=int, default=30, help="N, size of each GT's A_pos (Table 2.4b: 30-40)")
    paper.add_argument("--alpha", type=float, default=0.75, help="balance of loc_a and cls_c, Eq. 2.3-2.4 (Table 2.4c)")
    paper.add_argument("--gamma", type=float, default=1.0, help="re-weighting exponent, Eq. 2.4 (Table 2.4a)")
    paper.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=True,
                       help="c replaces the hard label (Table 2.3 SL)")
    paper.add_argument("--reweight", action=argparse.BooleanOptionalAction, default=True,
                       help="r weights the positives' losses (Table 2.3 SR)")
    paper.add_argument("--baseline", action="store_true",
                       help="the plain detector: --assign iou --no-soft-labels --no-reweight")
    paper.add_argument("--iou-thresholds", type=float, nargs=2, default=None, metavar=("FG", "BG"),
                       help="Eq. 2.2 thresholds for --assign iou (default: RetinaNet 0.5 0.4, RPN 0.7 0.3)")
    paper.add_argument("--soft-focal", default="qfl", choices=SOFT_FOCAL,
                       help="Eq. 2.1's focal BCE with a soft target c: GFL's quality focal loss (qfl, minimum at "
                            "p = c), Eq. 2.1 read literally (literal) or torchvision's sigmoid_focal_loss (blended); "
                            "hard labels always get the plain focal loss; CHOICE in the header")
    paper.add_argument("--focal-alpha", type=float, default=0.25, help="focal loss alpha (RetinaNet, Eq. 2.1 w_p/w_n)")
    paper.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (RetinaNet, Eq. 2.1 w_p/w_n)")
    paper.add_argument("--smooth-l1-beta", type=float, default=0.11,
                       help="RetinaNet regression smooth L1 beta (Detectron; 0 = torchvision's L1)")
    paper.add_argument("--schedule", default="1x", choices=list(SCHEDULES),
                       help="1x: 180k iterations at batch 8 (Sec. 2.5.1); 1.5x: 270k (Table 2.1); scaled by 8 / batch")
    paper.add_argument("--iters", type=int, default=None, help="exact number of iterations (instead of --schedule)")
    paper.add_argument("--batch-size", type=int, default=8, help="global batch (Sec. 2.5.1); LR and schedule follow it")
    paper.add_argument("--lr", type=float, default=None,
                       help="SGD LR at global batch 8; default 0.005 RetinaNet, 0.01 Faster R-CNN (Sec. 2.5.1)")
    paper.add_argument("--momentum", type=float, default=0.9, help="Sec. 2.5.1")
    paper.add_argument("--weight-decay", type=float, default=1e-4, help="Sec. 2.5.1")
    paper.add_argument("--warmup-iters", type=int, default=500,
                       help="LR warm-up at batch 8, scaled by 8 / batch (CHOICE: Detectron's RetinaNet warm-up)")
    paper.add_argument("--rpn-only", action="store_true",
                       help="Table 2.5: train the RPN of --arch faster_rcnn_fpn alone (box head frozen, out of the loss)")
    paper.add_argument("--backbone", default="resnet50", help="resnet50 / resnet101 / resnext101_32x8d (Table 2.2)")
    paper.add_argument("--train-scales", type=int, nargs="+", default=[800],
                       help="training short sides; 640 672 704 736 768 800 for multi-scale (Sec. 2.5.1)")
    paper.add_argument("--min-size", type=int, default=800, help="test short side (Sec. 2.5.1)")
    paper.add_argument("--max-size", type=int, default=1333, help="long side cap (Sec. 2.5.1)")
    paper.add_argument("--test-scales", type=int, nargs="+", default=None,
                       help="multi-scale testing: short sides tested besides --min-size (Table 2.1: 400 500 600 700 "
                            "900 1000 1100 1200, with --test-flip); the union of every view's detections, then NMS")
    paper.add_argument("--test-flip", action="store_true", help="also test each scale's horizontal flip (Table 2.1)")
    paper.add_argument("--top-fraction", type=float, default=0.02, help="Table 2.7: most confident share of predictions")

    system = p.add_argument_group("system")
    system.add_argument("--data", default="synthetic", help="'synthetic', a COCO root or VOC root(s)")
    system.add_argument("--train-split", default="train2017")
    system.add_argument("--val-split", default="val2017")
    system.add_argument("--pretrained", default=None,
                        help="'torchvision' (ImageNet IMAGENET1K_V1 backbone), 'torchvision:IMAGENET1K_V2' or a path")
    system.add_argument("--norm", default="frozen_bn", help="backbone norm: frozen_bn / bn / syncbn / gn")
    system.add_argument("--trainable-layers", type=int, default=3, help="torchvision's count (3: stem, res2 frozen)")
    system.add_argument("--anchor-sizes", type=int, nargs=5, default=None, help="base anchor size per level")
    system.add_argument("--output-dir", "--out", default="runs/noisy_anchor")
    system.add_argument("--resume", default="", help="checkpoint to continue from; 'auto': --output-dir/checkpoint.pth "
                                                     "when there is one (a fresh run otherwise)")
    system.add_argument("--checkpoint-every", type=int, default=0, help="also save every N steps")
    system.add_argument("--workers", type=int, default=4)
    system.add_argument("--device", default="auto")
    system.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on the CPU)")
    system.add_argument("--clip-grad", type=float, default=0.0)
    system.add_argument("--seed", type=int, default=0)
    system.add_argument("--log-every", type=int, default=20)
    system.add_argument("--synthetic-train", type=int, default=2000, help="synthetic training images")
    system.add_argument("--synthetic-val", type=int, default=500, help="synthetic validation images")
    system.add_argument("--synthetic-size", type=int, default=128)
    system.add_argument("--plot-pr", nargs="+", default=None, metavar="RUN_DIR",
                        help="only draw Fig. 2.2 from finished runs' results.json into --output-dir")
    system.add_argument("--demo", action="store_true",
                        help="CPU demo on the synthetic benchmark: RetinaNet R18 baseline vs NoisyAnchor -> --out/demo.json")
    system.add_argument("--demo-steps", type=int, nargs=2, default=[400, 300], metavar=("WARMUP", "ARM"),
                        help="demo: steps of the shared baseline warm-up, then of each arm (results/noisy_anchor.md: "
                             "arms at 1e-3: at 150 arm steps the baseline is still at 8.4 AP, at 300 at 13.1)")
    system.add_argument("--demo-arm-lr", type=float, default=3e-4,
                        help="demo: peak LR of each arm after the warm-up (the warm-up's: common.demo's 1e-3; "
                             "results/noisy_anchor.md: at 1e-3 the batch order alone moves an arm's AP by up to 2.6)")
    system.add_argument("--demo-images", type=int, nargs=2, default=[2000, 300], metavar=("TRAIN", "TEST"),
                        help="demo: synthetic training and held-out scenes")
    system.add_argument("--demo-cache", default="runs/synthetic_cache", help="demo: render cache folder")
    system.add_argument("--demo-backbone-steps", type=int, default=None,
                        help="demo: steps of the classifier whose backbone stands in for ImageNet weights (Sec. 2.5.1 "
                             "follows RetinaNet's protocol: ImageNet-pretrained ResNets); default "
                             "common.demo.IMAGENET_STANDIN_STEPS, 0: random init")
    return p


# ----------------------------------------------------------------------------------------------
# Anchor assignment and cleanliness (Sec. 2.4, Algorithm 1, Eq. 2.3-2.4)
# ----------------------------------------------------------------------------------------------
def topn_assign(iou: torch.Tensor, n: int) -> torch.Tensor:
    """Algorithm 1 lines 1-6. iou (G, A) anchor IoUs -> (A,) long: the ground truth that claims each
    anchor of A_pos (each GT claims its top-n anchors; a doubly claimed anchor goes to the GT with
    the higher IoU), -1 for A_neg."""
    num_gt, num_anchors = iou.shape
    matched = torch.full((num_anchors,), -1, dtype=torch.long, device=iou.device)
    if num_gt == 0 or num_anchors == 0 or n <= 0:
        return matched
    top = iou.topk(min(n, num_anchors), dim=1).indices  # (G, n)
    claimed = torch.zeros_like(iou, dtype=torch.bool).scatter_(1, top, True)  # (G, A)
    best_iou, best_gt = torch.where(claimed, iou, torch.full_like(iou, -1.0)).max(dim=0)  # (A,)
    return torch.where(best_iou >= 0, best_gt, matched)


class TopNMatcher:
    """Drop-in for torchvision's `Matcher` (RetinaNet.proposal_matcher, RPN.proposal_matcher)."""

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, n: int):
        self.n = n

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        return topn_assign(match_quality_matrix, self.n)


def cleanliness(loc_a: torch.Tensor, cls_c: torch.Tensor, alpha: float = 0.75) -> torch.Tensor:
    """Eq. 2.3 for b in A_pos (A_neg gets 0 by construction). Same shape out; no gradient."""
    return (alpha * loc_a + (1 - alpha) * cls_c).detach()  # Eq. 2.3


def reweight(loc_a: torch.Tensor, cls_c: torch.Tensor, alpha: float = 0.75, gamma: float = 1.0,
             eps: float = EPS) -> torch.Tensor:
    """Eq. 2.4 over the positives given, normalised to mean 1; finite for loc_a or cls_c = 1
    (both clamped to 1 - eps inside f). Same shape out; no gradient."""
    def f(x):
        return 1.0 / (1.0 - x.detach().clamp(max=1.0 - eps))

    r = (alpha * f(loc_a) + (1 - alpha) * f(cls_c)) ** gamma  # Eq. 2.4
    return r / r.mean() if r.numel() else r  # mean 1 over the positives


def paired_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of boxes1[i] with boxes2[i]: (P, 4), (P, 4) -> (P,)."""
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    return inter / (box_area(boxes1) + box_area(boxes2) - inter).clamp(min=1e-9)


# ----------------------------------------------------------------------------------------------
# Losses (pure functions; Eq. 2.1, 2.5, 2.6)
# ----------------------------------------------------------------------------------------------
def focal_bce(logits: torch.Tensor, t: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 2.1 element-wise: -t w_p log p - (1 - t) w_n log(1 - p), w_p = alpha (1 - p)^gamma,
    w_n = (1 - alpha) p^gamma (alpha < 0: no alpha weights; gamma 0 and alpha < 0: plain BCE)."""
    p = torch.sigmoid(logits)
    w_p, w_n = (1 - p) ** gamma, p ** gamma
    if alpha >= 0:
        w_p, w_n = alpha * w_p, (1 - alpha) * w_n
    return -t * w_p * F.logsigmoid(logits) - (1 - t) * w_n * F.logsigmoid(-logits)  # Eq. 2.1


def quality_focal_loss(logits: torch.Tensor, t: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """GFL's Quality Focal Loss element-wise: |t - p|^beta BCE(p, t) (no alpha, as in GFL); its
    minimum over p is p = t for every soft target t."""
    return (t - torch.sigmoid(logits)).abs() ** beta * F.binary_cross_entropy_with_logits(logits, t, reduction="none")


SOFT_FOCAL = ("literal", "blended", "qfl")


def soft_focal_loss(logits: torch.Tensor, t: torch.Tensor, kind: str = "qfl", alpha: float = 0.25,
                    gamma: float = 2.0) -> torch.Tensor:
    """The focal-weighted BCE of Eq. 2.5 with a soft target t (`--soft-focal`, CHOICE in the header):
    "literal" Eq. 2.1 with t replaced by c (`focal_bce`); "blended" torchvision's `sigmoid_focal_loss`
    (alpha_t (1 - p_t)^gamma BCE with p_t = p t + (1 - p)(1 - t)); "qfl" GFL's `quality_focal_loss`
    (beta = gamma). For hard labels the first two are the same focal loss."""
    if kind == "literal":
        return focal_bce(logits, t, alpha, gamma)
    if kind == "blended":
        return sigmoid_focal_loss(logits, t, alpha, gamma)
    if kind == "qfl":
        return quality_focal_loss(logits, t, gamma)
    raise ValueError(f"soft_focal={kind!r}: choose one of {SOFT_FOCAL}")


def noisy_anchor_losses(cls_logits, bbox_regression, anchors, targets, matched_idxs, box_coder, *,
                        alpha=0.75, gamma=1.0, soft_labels=True, reweighting=True, soft_focal="qfl",
                        focal_alpha=0.25, focal_gamma=2.0, beta=0.11) -> dict:
    """Eq. 2.5-2.6 for RetinaNet. cls_logits (B, A, K), bbox_regression (B, A, 4), anchors list of
    (A, 4), targets list of dicts, matched_idxs list of (A,) (>= 0: A_pos with its GT, -1: A_neg,
    -2: ignored, as torchvision's Matcher). `soft_focal` is the loss on soft targets; hard labels
    (soft_labels=False) get the plain focal loss, so with soft labels and re-weighting off this is
    focal loss + smooth L1 on the given assignment, normalised like torchvision's RetinaNet.
    Computed in float32 whatever the head returns (under --amp its outputs are float16 / bfloat16)."""
    cls_logits, bbox_regression = cls_logits.float(), bbox_regression.float()
    cls_losses, reg_losses = [], []
    for logits, deltas, anchors_i, target, matched in zip(cls_logits, bbox_regression, anchors, targets, matched_idxs):
        pos = torch.where(matched >= 0)[0]  # A_pos
        valid = matched != Matcher.BETWEEN_THRESHOLDS  # A_pos and A_neg
        gt_boxes = target["boxes"][matched[pos]]  # (P, 4)
        gt_labels = target["labels"][matched[pos]]  # (P,)
        with torch.no_grad():
            pred_boxes = box_coder.decode_single(deltas[pos].detach(), anchors_i[pos])  # regressed candidates
            loc_a = paired_iou(pred_boxes, gt_boxes)  # (P,)
            cls_c = torch.sigmoid(logits[pos, gt_labels].detach())  # (P,) prob. of the GT class
            ones = torch.ones_like(loc_a)
            c = cleanliness(loc_a, cls_c, alpha) if soft_labels else ones  # Eq. 2.3, soft labels
            r = reweight(loc_a, cls_c, alpha, gamma) if reweighting else ones  # Eq. 2.4
            t = torch.zeros_like(logits)  # (A, K): A_neg and the other classes keep label 0
            t[pos, gt_labels] = c
            w = torch.ones_like(logits[:, 0])  # (A,): negatives keep weight 1
            w[pos] = r
        num_pos = max(1, pos.numel())
        form = soft_focal if soft_labels else "literal"  # hard t: Eq. 2.1 = the plain focal loss
        per_anchor = soft_focal_loss(logits[valid], t[valid], form, focal_alpha, focal_gamma).sum(dim=1)  # (A_valid,)
        cls_losses.append((w[valid] * per_anchor).sum() / num_pos)  # Eq. 2.5
        reg_targets = box_coder.encode_single(gt_boxes, anchors_i[pos])
        reg = F.smooth_l1_loss(deltas[pos], reg_targets, beta=beta, reduction="none").sum(dim=1)  # (P,)
        reg_losses.append((r * reg).sum() / num_pos)  # Eq. 2.6
    return {"classification": sum(cls_losses) / len(cls_losses),
            "bbox_regression": sum(reg_losses) / max(1, len(reg_losses))}


# ----------------------------------------------------------------------------------------------
# Model pieces: torchvision's RetinaNet head and RPN with the losses above (same parameters)
# ----------------------------------------------------------------------------------------------
class NoisyAnchorHead(RetinaNetHead):
    """RetinaNet's head (same sub-modules, same state-dict keys) whose `compute_loss` is Eq. 2.5-2.6.
    RetinaNet.compute_loss calls it with the assignment of `model.proposal_matcher`."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, norm_layer=None, **loss_kwargs):
        super().__init__(in_channels, num_anchors, num_classes, norm_layer)
        self.loss_kwargs = loss_kwargs

    @classmethod
    def replacing(cls, head: RetinaNetHead, **loss_kwargs) -> "NoisyAnchorHead":
        """The same head (its weights and depth) with the NoisyAnchor loss."""
        cls_head = head.classification_head
        new = cls(cls_head.cls_logits.in_channels, cls_head.num_anchors, cls_head.num_classes, **loss_kwargs)
        new.classification_head.conv = cls_head.conv  # torchvision's 4 convs, or a demo's lighter stack
        new.regression_head.conv = head.regression_head.conv
        new.load_state_dict(head.state_dict())
        return new

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        return noisy_anchor_losses(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, targets,
                                   matched_idxs, self.regression_head.box_coder, **self.loss_kwargs)


class NoisyAnchorRPN(RegionProposalNetwork):
    """torchvision's RPN with soft labels and re-weighting in its loss (Tables 2.5-2.6). A_pos comes
    from `proposal_matcher` (TopNMatcher or the IoU Matcher), then the balanced sampler."""

    def __init__(self, rpn: RegionProposalNetwork, alpha=0.75, gamma=1.0, soft_labels=True, reweighting=True):
        sampler, matcher = rpn.fg_bg_sampler, rpn.proposal_matcher  # the RPN's own settings, kept as they are
        super().__init__(rpn.anchor_generator, rpn.head, matcher.high_threshold, matcher.low_threshold,
                         sampler.batch_size_per_image, sampler.positive_fraction, rpn._pre_nms_top_n,
                         rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh)
        self.min_size = rpn.min_size
        self.alpha, self.gamma, self.soft_labels, self.reweighting = alpha, gamma, soft_labels, reweighting

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        objectness, pred_bbox_deltas = objectness.float(), pred_bbox_deltas.float()  # float32 under --amp too
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)  # per image (A,) masks
        image_of = torch.cat([torch.full_like(lab, i, dtype=torch.long) for i, lab in enumerate(labels)])
        pos = torch.where(torch.cat(sampled_pos))[0]
        neg = torch.where(torch.cat(sampled_neg))[0]
        sampled = torch.cat([pos, neg])
        objectness = objectness.flatten()
        regression_targets = torch.cat(regression_targets)
        with torch.no_grad():
            # loc_a = IoU(regressed box, GT). Both boxes are decoded from the same anchor and IoU is
            # invariant to the anchor's shift and axis scaling, so a unit anchor gives the same IoU.
            unit = pred_bbox_deltas.new_tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(pos), 4)
            loc_a = paired_iou(self.box_coder.decode_single(pred_bbox_deltas[pos].detach(), unit),
                               self.box_coder.decode_single(regression_targets[pos], unit))
            cls_c = torch.sigmoid(objectness[pos].detach())
            c = cleanliness(loc_a, cls_c, self.alpha) if self.soft_labels else torch.ones_like(loc_a)  # Eq. 2.3
            r = torch.ones_like(loc_a)
            if self.reweighting:  # Eq. 2.4, mean 1 over each image's sampled positives
                for i in image_of[pos].unique():
                    m = image_of[pos] == i
                    r[m] = reweight(loc_a[m], cls_c[m], self.alpha, self.gamma)
            t = torch.cat([c, torch.zeros(len(neg), device=c.device)])
            w = torch.cat([r, torch.ones(len(neg), device=r.device)])
        bce = F.binary_cross_entropy_with_logits(objectness[sampled], t, reduction="none")
        objectness_loss = (w * bce).sum() / max(1, sampled.numel())  # Eq. 2.5
        box = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=1 / 9, reduction="none").sum(1)
        box_loss = (r * box).sum() / max(1, sampled.numel())  # Eq. 2.6
        return objectness_loss, box_loss


def build_model(args, num_classes: int) -> torch.nn.Module:
    """build_detector's RetinaNet (or Faster R-CNN FPN) with the anchor assignment and losses of the
    flags. The parameters (and so the checkpoints) are those of the plain torchvision model."""
    model = build_detector(args.arch, num_classes, backbone=args.backbone, norm=args.norm,
                           trainable_layers=args.trainable_layers, min_size=args.min_size, max_size=args.max_size,
                           pretrained=args.pretrained, anchor_sizes=args.anchor_sizes)
    return with_noisy_anchor(model, args)


def with_noisy_anchor(model: torch.nn.Module, args) -> torch.nn.Module:
    """`model` (a torchvision RetinaNet or Faster R-CNN) with the flags' assignment (Alg. 1 or Eq. 2.2)
    and losses (Eq. 2.5-2.6) in its head (RetinaNet) or RPN (Faster R-CNN); parameters unchanged."""
    if args.assign == "topn":
        matcher = TopNMatcher(args.topn)
    elif args.iou_thresholds is not None:
        matcher = Matcher(*args.iou_thresholds, allow_low_quality_matches=True)
    else:
        matcher = None  # the detector's own: RetinaNet 0.5 / 0.4, RPN 0.7 / 0.3 (Eq. 2.2)
    if isinstance(model, RetinaNet):
        model.head = NoisyAnchorHead.replacing(
            model.head, alpha=args.alpha, gamma=args.gamma, soft_labels=args.soft_labels, reweighting=args.reweight,
            soft_focal=args.soft_focal, focal_alpha=args.focal_alpha, focal_gamma=args.focal_gamma,
            beta=args.smooth_l1_beta)
        model.proposal_matcher = matcher or model.proposal_matcher
    else:
        model.rpn = NoisyAnchorRPN(model.rpn, args.alpha, args.gamma, args.soft_labels, args.reweight)
        model.rpn.proposal_matcher = matcher or model.rpn.proposal_matcher
    return model


# ----------------------------------------------------------------------------------------------
# Training (1x schedule of Sec. 2.5.1) through the shared loop
# ----------------------------------------------------------------------------------------------
SCHEDULES = {"1x": 180_000, "1.5x": 270_000}  # iterations at global batch 8: Sec. 2.5.1, Table 2.1's longer one


def schedule(args) -> dict:
    """The paper's SGD schedule (Sec. 2.5.1: LR at global batch 8, drops at 120k / 160k of 180k, i.e. at
    2/3 and 8/9) for the global batch B, scaled as Detectron2's reference world size does: LR x B/8,
    the --schedule's iterations and the warm-up x 8/B. An explicit --iters is taken as it is."""
    scale = args.batch_size / 8
    iters = args.iters if args.iters is not None else round(SCHEDULES[args.schedule] / scale)
    return {"lr": args.lr * scale, "iters": iters, "warmup": min(iters, round(args.warmup_iters / scale)),
            "milestones": (iters * 2 // 3, iters * 8 // 9)}


def rpn_losses(model, images, targets) -> dict:
    """--rpn-only (Table 2.5): the RPN's two losses; the box head's are left out."""
    return {k: v for k, v in model(images, targets).items() if k in ("loss_objectness", "loss_rpn_box_reg")}


def train(args, env, model, train_set, out_dir: Path):
    if args.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {args.batch_size} is the global batch and must divide over the "
                         f"{env.world_size} processes (each trains on an equal share): give a multiple of {env.world_size}")
    per_rank = args.batch_size // env.world_size  # --batch-size is the global batch (paper: 8)
    sched = schedule(args)  # LR, iterations, warm-up and LR drops for this global batch
    loader = build_loader(train_set, per_rank, train=True, workers=args.workers, seed=args.seed)
    if args.rpn_only:  # Table 2.5: the RPN trained alone, the box head frozen
        model.roi_heads.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=sched["lr"], momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = build_scheduler(optimizer, sched["iters"], warmup_steps=sched["warmup"], warmup_factor=1 / 3,
                                milestones=sched["milestones"])
    resume = resolve_resume(args.resume, out_dir)
    # The loss lives inside the model (NoisyAnchorHead / NoisyAnchorRPN), so the default loss_fn,
    # model(images, targets), is the method's loss and DDP sees one ordinary forward.
    train_detector(wrap_ddp(model, env), loader, optimizer, scheduler, epochs=math.ceil(sched["iters"] / len(loader)),
                   max_steps=sched["iters"], out_dir=out_dir, args=args, amp=args.amp, clip_grad=args.clip_grad,
                   loss_fn=rpn_losses if args.rpn_only else None, checkpoint_every=args.checkpoint_every,
                   resume=resume, log_every=args.log_every, desc=out_dir.name)
    return model


# ----------------------------------------------------------------------------------------------
# Evaluation: AP, proposal AR (Table 2.5), confidence vs IoU (Table 2.7), PR curves (Fig. 2.2)
# ----------------------------------------------------------------------------------------------
def sharing(module: torch.nn.Module, **attrs) -> torch.nn.Module:
    """A shallow copy of `module` (every parameter and sub-module shared) with `attrs` set on the copy
    only; a sub-module among them replaces the copy's own, never the original's."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


class OnePass(torch.nn.Module):
    """One evaluation pass of a RetinaNet or Faster R-CNN, the model itself left untouched: each
    image's detections as they enter the detector's NMS (its score threshold, per-level top-k and
    box filtering applied; NMS and the per-image cap not), in original image coordinates; for a
    Faster R-CNN also its RPN proposals in score order (`proposals`). `after_nms` turns the
    candidates into the detector's own output, so AP, Table 2.7 and Table 2.5 need one pass.
    Multi-scale testing (Table 2.1, Detectron's union heuristic): with extra short sides `scales`
    and / or `flip`, the candidates are the union of every test view's (the model's own short side,
    each extra one, and their horizontal flips mapped back), and `after_nms` is the NMS over that
    union; proposals are the first view's."""

    def __init__(self, model: torch.nn.Module, scales=None, flip: bool = False):
        super().__init__()
        self.model = model
        # the post-processing module as a shallow copy: its NMS threshold (an IoU above 1
        # suppresses nothing) and cap differ from the model's, every parameter is shared
        no_nms = dict(nms_thresh=1.01, detections_per_img=10**9)
        self.post = sharing(model, **no_nms) if isinstance(model, RetinaNet) else sharing(model.roi_heads, **no_nms)
        base = model.transform
        views = []  # (transform, flipped): the long side cap scales with the short side
        for size in [base.min_size[-1], *(scales or [])]:  # Detectron: the test scale, then the extra ones
            t = sharing(base, min_size=(size,), max_size=round(size * base.max_size / base.min_size[-1]))
            views += [(t, False)] + ([(t, True)] if flip else [])
        self.views = views
        self.train(model.training)  # so that `predict` leaves the model in the mode it found it in

    def forward(self, images):
        for t, _ in self.views:  # a plain list: eval() / train() do not reach these copies
            t.training = self.model.training
        per_view = [self._view(images, t, flipped) for t, flipped in self.views]
        if len(per_view) == 1:
            return per_view[0]
        merged = []
        for outs in zip(*per_view):  # one image's detections in every view
            d = {k: torch.cat([o[k] for o in outs]) for k in ("boxes", "scores", "labels")}
            merged.append({**d, "proposals": outs[0]["proposals"]} if "proposals" in outs[0] else d)
        return merged

    def _view(self, images, transform, flipped: bool):
        m = self.model
        sizes = [im.shape[-2:] for im in images]
        if flipped:
            images = [im.flip(-1) for im in images]
        if isinstance(m, RetinaNet):
            out = sharing(self.post, transform=transform)(images)
        else:
            image_list, _ = transform(images)
            features = m.backbone(image_list.tensors)
            proposals, _ = m.rpn(image_list, features)
            detections, _ = self.post(features, proposals, image_list.image_sizes)
            out = transform.postprocess(detections, image_list.image_sizes, sizes)
            props = transform.postprocess([{"boxes": b} for b in proposals], image_list.image_sizes, sizes)
            out = [{**o, "proposals": p["boxes"]} for o, p in zip(out, props)]
        if flipped:  # boxes back into the unflipped image
            for o, (_, w) in zip(out, sizes):
                for k in ("boxes", "proposals"):
                    if k in o:
                        o[k] = torch.stack([w - o[k][:, 2], o[k][:, 1], w - o[k][:, 0], o[k][:, 3]], 1)
        return out


def after_nms(candidates, nms_thresh: float, detections_per_img: int) -> list[dict]:
    """The detector's own last step on `OnePass` candidates: class-wise NMS, then the per-image cap."""
    out = []
    for c in candidates:
        keep = batched_nms(c["boxes"], c["scores"], c["labels"], nms_thresh)[:detections_per_img]
        out.append({k: c[k][keep] for k in ("boxes", "scores", "labels")})
    return out


def confidence_iou_stats(predictions, targets, top_fraction: float = 0.02) -> dict:
    """Table 2.7: mean confidence and mean IoU (with the best GT of the predicted class) of the
    `top_fraction` most confident predictions pooled over all images, and their Pearson r."""
    scores, ious = [], []
    for p, t in zip(predictions, targets):
        if len(p["scores"]) == 0:
            continue
        iou = box_iou(p["boxes"].float(), t["boxes"].float())  # (D, G)
        same = p["labels"][:, None] == t["labels"][None, :]
        best = torch.where(same, iou, torch.zeros_like(iou)).amax(dim=1) if iou.shape[1] else iou.new_zeros(len(iou))
        scores.append(p["scores"].float())
        ious.append(best)
    if not scores:
        return {"mean_conf": float("nan"), "mean_iou": float("nan"), "pearson_r": float("nan"), "count": 0}
    scores, ious = torch.cat(scores), torch.cat(ious)
    k = max(1, math.ceil(top_fraction * len(scores)))
    top = scores.topk(k).indices
    s, u = scores[top].double().numpy(), ious[top].double().numpy()
    r = float(np.corrcoef(s, u)[0, 1]) if k > 1 and s.std() > 0 and u.std() > 0 else float("nan")
    return {"mean_conf": float(s.mean()), "mean_iou": float(u.mean()), "pearson_r": r, "count": k}


def proposal_recall(proposals, targets, ks=(100, 300, 1000)) -> dict:
    """Table 2.5: AR@k = mean over IoU 0.5:0.95 of the recall of all non-crowd GTs by the first k
    proposals, with greedy one-to-one matching (Detectron's proposal evaluation)."""
    best = {k: [] for k in ks}  # per k: the IoU each GT is covered with
    for p, t in zip(proposals, targets):
        gt = t["boxes"].float()
        if "iscrowd" in t:
            gt = gt[torch.as_tensor(t["iscrowd"]) == 0]
        for k in ks:
            iou = box_iou(gt, p["boxes"][:k].float())  # (G, k)
            covered = torch.zeros(len(gt))
            for _ in range(min(iou.shape)):  # take the best remaining (GT, proposal) pair each time
                v, j = iou.max(dim=1)
                g = int(v.argmax())
                covered[g] = v[g]
                iou[g, :], iou[:, j[g]] = -1, -1
            best[k].append(covered)
    out = {}
    for k in ks:
        covered = torch.cat(best[k]) if best[k] else torch.zeros(0)
        recalls = [(covered >= t).float().mean().item() if len(covered) else 0.0 for t in AR_IOUS]
        out[f"AR@{k}"] = float(np.mean(recalls))
    return out


PR_PANELS = {  # Fig. 2.2: panel -> curve name -> (IoU index or None for 0.5:0.95, area index, maxDet index)
    "IoU threshold": {"IoU=0.5": (0, 0, 2), "IoU=0.75": (5, 0, 2), "IoU=0.5:0.95": (None, 0, 2)},
    "object size": {"small": (None, 1, 2), "medium": (None, 2, 2), "large": (None, 3, 2)},
    "maxDet": {"maxDet=1": (None, 0, 0), "maxDet=10": (None, 0, 1), "maxDet=100": (None, 0, 2)},
}


def pr_curves(predictions, targets) -> dict:
    """Fig. 2.2: precision at COCO's 101 recall points, averaged over classes (those with GT), from
    COCOeval's accumulated `precision` (T, R, K, A, M) for each curve of PR_PANELS."""
    prec = coco_precision(predictions, targets)  # (T, R, K, A, M)
    if prec is None:
        return {}
    out = {}
    for panel, curves in PR_PANELS.items():
        for name, (t, a, m) in curves.items():
            p = prec[:, :, :, a, m] if t is None else prec[t:t + 1, :, :, a, m]  # (T, R, K)
            valid = p > -1  # -1: class without ground truth in this area range
            count = valid.sum(axis=(0, 2))
            curve = np.where(count > 0, np.where(valid, p, 0).sum(axis=(0, 2)) / np.maximum(count, 1), np.nan)
            out[f"{panel}/{name}"] = [None if np.isnan(v) else float(v) for v in curve]
    return out


def plot_pr_curves(runs: dict, path: Path) -> None:
    """Fig. 2.2: one panel per PR_PANELS entry; line style per run, colour per curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recall = np.linspace(0, 1, 101)
    styles = ["--", "-", ":", "-."]
    fig, axes = plt.subplots(1, len(PR_PANELS), figsize=(4.2 * len(PR_PANELS), 3.6))
    for ax, (panel, curves) in zip(axes, PR_PANELS.items()):
        for ci, name in enumerate(curves):
            for ri, (run_name, pr) in enumerate(runs.items()):
                y = pr.get(f"{panel}/{name}")
                if y is None:
                    continue
                y = np.array([np.nan if v is None else v for v in y])
                ax.plot(recall, y, styles[ri % len(styles)], color=f"C{ci}", label=f"{run_name} {name}")
        ax.set_title(f"PR by {panel}")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6)
    fig.suptitle("Precision vs recall (Fig. 2.2)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(args, env, model, val_set) -> dict:
    """AP (COCOeval; on VOC, Detectron2's VOC AP set); Table 2.7 before / after NMS; Fig. 2.2 curves;
    Faster R-CNN: proposal AR (Table 2.5). One pass over `val_set`, gathered on rank 0 only (the
    candidates before NMS are millions of boxes at COCO scale); the other ranks return {}."""
    model.to(env.device).eval()
    loader = build_loader(val_set, max(1, args.batch_size // env.world_size), train=False, workers=args.workers)
    candidates, targets = predict(OnePass(model, args.test_scales, args.test_flip), loader, env.device, dst=0)
    if not is_main():
        return {}
    post = model if isinstance(model, RetinaNet) else model.roi_heads
    predictions = after_nms(candidates, post.nms_thresh, post.detections_per_img)
    results = {"metrics": evaluate_predictions(predictions, targets, evaluation_metric(args.data)),
               "table2_7": {"before_nms": confidence_iou_stats(candidates, targets, args.top_fraction),
                            "after_nms": confidence_iou_stats(predictions, targets, args.top_fraction)},
               "pr_curves": pr_curves(predictions, targets)}
    if isinstance(model, FasterRCNN):
        results["proposal_recall"] = proposal_recall([{"boxes": c["proposals"]} for c in candidates], targets)
    return results


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def build_datasets(args):
    kw = dict(num_images=args.synthetic_train, image_size=args.synthetic_size, seed=args.seed)
    train_set = build_detection_dataset(args.data, args.train_split,
                                        detection_transforms(True, args.train_scales, args.max_size), **kw, train=True)
    kw["num_images"] = args.synthetic_val
    val_set = build_detection_dataset(args.data, args.val_split, detection_transforms(False), **kw)
    return train_set, val_set


def run(args, env) -> dict:
    """Train one detector with the flags' assignment and losses, evaluate it, write results.json."""
    out = Path(args.output_dir)
    train_set, val_set = build_datasets(args)
    t0 = time.time()
    seed_everything(args.seed)
    model = build_model(args, len(train_set.classes))
    train(args, env, model, train_set, out)
    results = evaluate(args, env, unwrap(model), val_set)
    results["flags"] = {k: getattr(args, k) for k in ("arch", "assign", "topn", "alpha", "gamma", "soft_labels",
                                                       "reweight", "soft_focal", "rpn_only", "backbone", "batch_size",
                                                       "schedule", "iters", "seed")}
    results["minutes"] = (time.time() - t0) / 60
    if is_main():
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot_pr_curves({out.name: results["pr_curves"]}, out / "fig2_2_pr_curves.png")
    barrier()
    return results


def print_tables(results: dict) -> None:
    print(f"\n{'method':<22}{'AP':>7}{'AP50':>7}{'AP75':>7}{'APs':>7}{'APm':>7}{'APl':>7}   (%, Table 2.2 / 2.3 style)")
    for name, r in results.items():
        m = r["metrics"]  # n/a: no ground truth in that size range (COCO's -1) or not a VOC metric
        print(f"{name:<22}" + "".join(f"{format_ap(m.get(k)):>7}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")))
    print(f"\n{'Table 2.7':<22}{'before NMS: conf':>17}{'IoU':>7}{'r':>8}{'after NMS: conf':>17}{'IoU':>7}{'r':>8}")
    for name, r in results.items():
        b, a = r["table2_7"]["before_nms"], r["table2_7"]["after_nms"]
        print(f"{name:<22}{b['mean_conf']:>17.3f}{b['mean_iou']:>7.3f}{b['pearson_r']:>8.3f}"
              f"{a['mean_conf']:>17.3f}{a['mean_iou']:>7.3f}{a['pearson_r']:>8.3f}")
    if any("proposal_recall" in r for r in results.values()):
        print(f"\n{'Table 2.5':<22}{'AR@100':>8}{'AR@300':>8}{'AR@1000':>9}")
        for name, r in results.items():
            if "proposal_recall" in r:
                ar = r["proposal_recall"]
                print(f"{name:<22}" + "".join(f"{100 * ar[k]:>8.1f}" for k in ("AR@100", "AR@300")) +
                      f"{100 * ar['AR@1000']:>9.1f}")


BASELINE_FLAGS = dict(assign="iou", soft_labels=False, reweight=False)  # --baseline: plain RetinaNet / RPN
DEMO_DEFAULTS = dict(device="cpu", workers=0, batch_size=8, output_dir="runs/noisy_anchor_demo")


# ----------------------------------------------------------------------------------------------
# CPU demo (common.demo's recipe): Table 2.2's comparison and Table 2.7 on the synthetic benchmark
# ----------------------------------------------------------------------------------------------
# Mean number of RetinaNet anchors (sizes 32-512, 3 scales x 3 ratios, strides 8-128) with IoU >= 0.5
# per ground-truth box on an 800 x 1216 image, for boxes with COCO's size mix (41 / 34 / 25 % small /
# medium / large, sqrt(area) log-uniform within each range, aspect ratio 1/3-3, uniform position):
# 16.4 (4,000 boxes; 1.8 small, 25.5 medium, 28.1 large). The paper's N = 30 is ~1.8x that.
COCO_ANCHORS_PER_GT = 16.4
DEMO_ARMS = {  # name -> flags on top of the paper's defaults
    "baseline": BASELINE_FLAGS,
    "noisy_anchor": {},  # --soft-focal qfl (the default)
    "noisy_anchor_literal": {"soft_focal": "literal"},
    "noisy_anchor_blended": {"soft_focal": "blended"},
}
DEMO_HEAD_CONVS = 2  # demo only: two 3x3 convs per head branch (RetinaNet: 4), half the head's cost


def anchors_per_gt(model: RetinaNet, dataset, num_images: int = 200, iou_threshold: float = 0.5) -> float:
    """Mean number of `model`'s anchors with IoU >= `iou_threshold` per ground-truth box of the first
    `num_images` images of `dataset` (uint8 images, all of one size)."""
    from torchvision.models.detection.image_list import ImageList

    h, w = dataset.image_size(0)
    x = torch.zeros(1, 3, h, w)
    with torch.no_grad():
        anchors = model.anchor_generator(ImageList(x, [(h, w)]), list(model.backbone(x).values()))[0]
    counts = [(box_iou(torch.as_tensor(dataset.annotations(i)["boxes"]), anchors) >= iou_threshold).sum(1)
              for i in range(min(num_images, len(dataset)))]
    return torch.cat(counts).float().mean().item()


def demo_model(num_classes: int, flags: argparse.Namespace, pretrained=None) -> RetinaNet:
    """common.demo's RetinaNet R18-FPN (anchors 16-256 on P3-P7, trainable BN) with DEMO_HEAD_CONVS
    convs per head branch and the assignment / losses of `flags`; backbone from `pretrained` (a
    classifier state dict) when given."""
    from common.demo import build_demo_detector

    model = build_demo_detector(num_classes, arch="retinanet", pretrained=pretrained)
    for branch in (model.head.classification_head, model.head.regression_head):
        branch.conv = branch.conv[:DEMO_HEAD_CONVS]
    return with_noisy_anchor(model, flags)


def demo(args, env) -> dict:
    """RetinaNet (IoU labels, focal loss) against NoisyAnchor on the synthetic benchmark: one shared
    warm-up of the baseline, so that cls_c and loc_a mean something, then every arm (the baseline
    and NoisyAnchor with each --soft-focal form) trains the same further steps from it on the same
    batches; AP and Table 2.7 on held-out scenes; OUT/demo.json."""
    from common.demo import IMAGENET_STANDIN_STEPS, DEMO_RECIPE, claim, imagenet_standin, train_demo_detector, write_demo_result
    from common.engine import load_checkpoint, save_checkpoint
    from common.synthetic import SyntheticDetection

    t0 = time.time()
    out, seed = Path(args.output_dir), args.seed
    resume = args.resume == "auto"
    if args.resume not in ("", "auto"):
        raise SystemExit("--demo takes --resume auto (finished stages in --out are reused), not a path")
    if out.exists() and any(out.iterdir()) and not resume:
        raise SystemExit(f"--out {out} is not empty: use another folder, or --resume auto to reuse its finished stages")
    size, warm_steps, arm_steps = DEMO_RECIPE["scene_size"], *args.demo_steps
    train_set = SyntheticDetection(args.demo_images[0], size, seed=1000 * seed + 3, cache=args.demo_cache)
    test_set = SyntheticDetection(args.demo_images[1], size, seed=1000 * seed + 4, cache=args.demo_cache,
                                  transforms=detection_transforms(False))
    num_classes = len(train_set.classes)

    def flags(**over):
        return argparse.Namespace(**{**vars(args), **over})

    # N scaled from the paper's 30 by the anchors an object gets at IoU >= 0.5 here and on COCO
    torch.manual_seed(seed)
    per_gt = anchors_per_gt(demo_model(num_classes, flags(**BASELINE_FLAGS)), train_set)
    topn = max(1, round(args.topn * per_gt / COCO_ANCHORS_PER_GT))
    print(f"[demo] {per_gt:.1f} anchors per box at IoU >= 0.5 (COCO: {COCO_ANCHORS_PER_GT}): N = "
          f"{args.topn} x {per_gt:.1f} / {COCO_ANCHORS_PER_GT} = {topn}", flush=True)

    warm_path = out / "warmup" / "checkpoint.pth"
    backbone_steps = IMAGENET_STANDIN_STEPS if args.demo_backbone_steps is None else args.demo_backbone_steps
    standin = {"steps": 0, "wall_s": 0.0, "cached": False, "state_dict": None}
    if backbone_steps and not (resume and warm_path.is_file()):  # the paper's ImageNet init, here the demo classifier
        standin = imagenet_standin(seed, backbone_steps, cache=args.demo_cache)
    torch.manual_seed(seed)
    warm = demo_model(num_classes, flags(**BASELINE_FLAGS), pretrained=standin["state_dict"])
    if resume and warm_path.is_file():
        saved = load_checkpoint(warm_path)
        warm.load_state_dict(saved["model"])
        warm_wall = saved["wall_s"]
    else:
        warm_wall = train_demo_detector(warm, train_set, warm_steps, seed=seed)
        save_checkpoint(warm_path, {"model": warm.state_dict(), "args": vars(args), "wall_s": warm_wall})
    results, walls = {"warmup": evaluate(args, env, warm, test_set)}, {"warmup": warm_wall}
    for name, arm in DEMO_ARMS.items():
        path = out / name / "results.json"
        if resume and path.is_file():
            results[name] = json.loads(path.read_text())
        else:
            model = demo_model(num_classes, flags(**{"topn": topn, **arm}))
            model.load_state_dict(warm.state_dict())
            wall = train_demo_detector(model, train_set, arm_steps, seed=seed + 1,  # the same batches for every arm
                                       lr=args.demo_arm_lr)
            results[name] = {**evaluate(args, env, model, test_set), "train_wall_s": wall}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(results[name]))
        walls[name] = results[name]["train_wall_s"]
        print(f"[demo {time.time() - t0:.0f}s] {name}: AP {format_ap(results[name]['metrics']['AP'])}", flush=True)

    print_tables(results)
    plot_pr_curves({n: r["pr_curves"] for n, r in results.items() if n != "warmup"}, out / "fig2_2_pr_curves.png")
    m = {n: r["metrics"] for n, r in results.items()}
    claims = [claim("NoisyAnchor > RetinaNet", metric, ("NoisyAnchor", m["noisy_anchor"][metric]),
                    ("RetinaNet", m["baseline"][metric])) for metric in ("AP", "AP75")]
    tables = {
        "setting": {"train_images": len(train_set), "test_images": len(test_set), "image_size": size,
                    "warmup_steps": warm_steps, "arm_steps": arm_steps, "arm_lr": args.demo_arm_lr, "batch_size": DEMO_RECIPE["detector"]["batch_size"],
                    "anchors_per_gt_iou50": round(per_gt, 2), "coco_anchors_per_gt_iou50": COCO_ANCHORS_PER_GT,
                    "topn": topn, "head_convs": DEMO_HEAD_CONVS,
                    "backbone": {"init": f"demo classifier, {backbone_steps} steps" if backbone_steps else "random",
                                 "train_wall_s": round(standin["wall_s"], 1), "cached": standin["cached"]}, "train_wall_s": {n: round(w, 1) for n, w in walls.items()}},
        "ap": {n: {k: (v if v >= 0 else None) for k, v in mm.items()} for n, mm in m.items()},  # None: no GT in range
        "table2_7": {n: r["table2_7"] for n, r in results.items()},
    }
    return write_demo_result(out, "noisy_anchor.py", seed, time.time() - t0, claims, _finite(tables))


def _finite(obj):
    """NaN (a Pearson r of constant values) as None, so demo.json stays valid JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def plot_only(args) -> None:
    runs = {}
    for d in args.plot_pr:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"--plot-pr {d}: no results.json there (a finished run of this script writes one)")
        runs[Path(d).name] = json.loads(path.read_text())["pr_curves"]
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    plot_pr_curves(runs, Path(args.output_dir) / "fig2_2_pr_curves.png")
    print(f"wrote {Path(args.output_dir) / 'fig2_2_pr_curves.png'}")


def main(args) -> dict:
    if args.plot_pr:
        return plot_only(args)
    env = init_distributed(args.device)
    try:
        if args.demo:
            return demo(args, env)
        results = run(args, env)
        if is_main():
            print_tables({Path(args.output_dir).name: results})
        return results
    finally:
        cleanup()


def parse_args(argv=None) -> argparse.Namespace:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:  # the demo's settings, under any flag given explicitly
        parser.set_defaults(**DEMO_DEFAULTS)
        args = parser.parse_args(argv)
    if args.baseline:
        vars(args).update(BASELINE_FLAGS)
    if args.lr is None:
        args.lr = 0.005 if args.arch == "retinanet" else 0.01  # Sec. 2.5.1
    if args.rpn_only and args.arch != "faster_rcnn_fpn":
        parser.error("--rpn-only trains the RPN of a Faster R-CNN: add --arch faster_rcnn_fpn")
    if args.topn < 1 or not 0.0 <= args.alpha <= 1.0 or args.gamma < 0:
        parser.error(f"need --topn >= 1, 0 <= --alpha <= 1 and --gamma >= 0 (got {args.topn}, {args.alpha}, {args.gamma})")
    return args


if __name__ == "__main__":
    main(parse_args())
