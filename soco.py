"""SoCo: Aligning Pretraining for Detection via Object-Level Contrastive Learning.

Wei, Gao, Wu, Hu, Lin, NeurIPS 2021. https://arxiv.org/abs/2106.02637

Self-supervised pre-training of a whole detector (backbone, FPN, R-CNN head) on object proposals:
selective-search boxes are followed through three views of an image (V1 whole, V2 a crop, V3 the
crop downsampled), pooled by RoIAlign from the FPN level their size calls for, and pulled together
BYOL-style (online network + predictor against an EMA target network). Three stages:

    proposals  Sec. 3.2  selective search + filter, once, offline       (stage_proposals)
    pretrain   Sec. 3-4.1  SoCo / SoCo* (the default stage)              (stage_pretrain)
    finetune   Sec. 4.2  transfer into Mask R-CNN FPN (4conv1fc) / C4    (stage_finetune)
    export     the pre-trained weights under Detectron2's / MMDetection's names  (stage_export)

Equations -> functions (pure, tensors in and out):
    Sec. 3.2 proposal filter (1/3 <= w/h <= 3, 0.3 <= sqrt(wh/WH) <= 0.8)   filter_proposals
    Sec. 3.2 box jitter (x + r w, y + r h, w + r w, h + r h, p = 0.5)         jitter_boxes
    Sec. 3.3 scale-aware assignment {48, 96, 192, 224}^2 -> P2..P5           assign_fpn_levels
    Eq. (1-3) h = f^H(RoIAlign(f^I(V), b))                                   ObjectEncoder.forward
    Eq. (4)  v = q(g(h)) online, v' = g(h') target                          SoCo.forward
    Eq. (5-6) L = mean_i [-2 cos(v_i, v'_i) - 2 cos(v_i, v''_i)]             soco_loss
    Sec. 4.1 tau from 0.99 to 1 on a cosine (BYOL)                            target_momentum

CHOICE (the paper is silent):
- Proposal fallback when the Sec. 3.2 filter leaves an image with no box: the filter with sizes
  relaxed to 0.1 <= sqrt(wh/WH) <= 1 (aspect kept), then the whole image (released code: "relax,
  then whole image"). `--min-box-side` (released code: 32 px) is 0 by default, as in the paper.
- K proposals are drawn (without replacement, padded by repeats) among those that overlap the
  region every crop shares (V2; also V3/V4 when they are independent crops) and clipped to each
  crop; if none overlaps, that shared region is the box (released code: the whole view).
- V2 (and V4, and an independent V3) is cropped from the image itself and resized, as the release
  does ("a random crop ... on V1" reads either way; a crop of the 224-px V1 would be up-sampled).
  The crop scale is 0.5-1 (Sec. 3.2; the release's FPN) or, for `--arch c4`, the release's 0.6-1.
- Box jitter is applied to V1's boxes only (released code); r is drawn per coordinate.
- Without scale-aware assignment (`--no-scale-aware`, Tab. 4) a box goes to the level of the FPN
  paper's rule k = floor(4 + log2(sqrt(wh) / 224)), the one torchvision's detectors use.
- `--no-fpn` pools 7x7 RoIs from C5 (stride 32); `--no-head` average-pools the RoI feature
  instead of running the R-CNN head (Tab. 4 rows without FPN / head).
- `--proposals-kind random` draws K random boxes per image per step under the Sec. 3.2
  constraints (Tab. 5(c)); `--proposals-kind whole` uses the whole image as the only box (K = 1,
  Tab. 4 row 1).
- Fine-tuning (Sec. 4.2) uses detectron2's scales (COCO short side 640-800, VOC 480-800, max 1333,
  test 800), SGD momentum 0.9, warm-up from 0.001 over 1000 iterations (COCO) / 100 (VOC), and
  detectron2's evaluators: COCOeval on COCO, PascalVOCDetectionEvaluator on VOC test2007 (devkit
  AP, difficult objects ignored, the 11-point metric, AP the mean over IoU 0.50:0.95;
  `common.evaluation.evaluation_metric` picks it from --det-data).
- Level thresholds scale with `--view-size` / 224 (V1's side; one set of thresholds for every
  view, so V3's boxes still drop a level), as do the blur's sigma (0.1-2.0 at 224, BYOL's and the
  release's, the same in every view as the release's V3) and kernel (23 px): a small-view run (the
  demo's 64 px) keeps the paper's relative assignment and blur.
- In-box cutout (the release's RandomCutoutInBbox: per box with probability p a zeroed square of
  0.1-0.3 of its area on V2/V3, after normalisation) is not in the paper and off by default; the
  release's 100-epoch FPN and both C4 recipes use it: `--cutout-prob 0.5` (its 400-epoch FPN / FPN*
  recipes do not).
- Fine-tuning pools RoIs with aligned=True and pre-training's sampling ratio (`--roi-sampling-ratio`,
  0 = adaptive: Detectron2's ROIAlignV2, the release's fine-tuning pooler; torchvision's detectors
  pool with aligned=False), box and mask heads alike.
- `--accum-steps n` accumulates n micro-batches per update: the paper's 2048 ran as 16 V100 x 128
  (the release's per-GPU batch); on 8 GPUs `--accum-steps 2` keeps 128 per GPU (256 per GPU needs
  about twice the activation memory, not measured here: no GPU). BN (SyncBN) then normalises over
  8 x 128, not 2048.
- Proposals are stored as whole pixels (uint16) without repeated boxes; `--ss-max-side` (off)
  runs selective search on a downscaled copy for speed.
- SyncBN (Sec. 4.1) is used on more than one GPU; PyTorch has no SyncBN on the CPU, where a
  multi-process run keeps per-rank BN statistics.
- The demo (`DEMO`, `run_demo`) shrinks everything to fit CPU minutes (its own CHOICE block).

Released-code facts followed (IMPLEMENTATION_NOTES.md, SoCo): RoIAlign 7x7 aligned=True; head
4 x (conv 3x3 256 + BN + ReLU) + fc 1024; projector 1024 -> 4096 (BN, ReLU) -> 256, predictor
256 -> 4096 -> 256; BYOL's asymmetric augmentations (V1: blur p=1; V2/V3: blur p=0.1, solarize
p=0.2; all: colour jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, own flip); per-iteration
momentum m = 1 - (1 - 0.99)(cos(pi k / K) + 1) / 2 on parameters only (target = backbone, FPN,
head, projector); LARS trust coefficient 0.001, momentum 0.9, biases and norm parameters with
neither weight decay nor adaptation (timm's Lars + its weight-decay groups); warm-up from lr/100.

DEVIATION (we differ from the paper or the released code):
- The FPN has no normalisation (the released code and its detectron2 configs put (Sync)BN in the
  FPN): ours is torchvision's FPN, the one `common.detectors` builds, so every FPN tensor transfers.
- Transfer goes into Mask R-CNN R50-FPN with the 4conv1fc head (Tab. 1-2; trained on COCO's masks),
  but only its box AP is reported: the project's metrics have no mask AP (AP^mk of Tables 1-2, 8).
- Selective search is OpenCV-contrib's implementation of Uijlings et al. (fast mode by default;
  `--ss-mode quality` for the slower one) instead of the released single-strategy Python port.
- `--v3-crop independent` (off by default) reproduces the released code's independent 112 crop;
  the default is the paper's V2 downsampled to 112.

Full-scale commands (ImageNet-1k as /data/imagenet/train/<class>/*.JPEG, COCO 2017):
    python soco.py proposals --data /data/imagenet --ss-workers 64       # -> runs/soco/proposals
    torchrun --nproc_per_node 8 soco.py --epochs 400 --data /data/imagenet --amp \\
        --out runs/soco/fpn_400ep                                         # add --star for SoCo*
    torchrun --nproc_per_node 8 soco.py finetune --weights runs/soco/fpn_400ep/soco_weights.pth \\
        --det-data /data/coco --schedule 1x --out runs/soco/coco_1x             # --fraction 0.05: Tab. 8
    # R50-C4 (Tab. 2-3): --arch c4 for pretrain, --det-arch faster_rcnn_c4 --schedule voc for VOC
    # the release's 100-epoch FPN / C4 recipes also add --cutout-prob 0.5; 8 GPUs: --accum-steps 2
    python soco.py export --to detectron2 --weights runs/soco/fpn_400ep/soco_weights.pth --out soco_d2.pkl
    python soco.py export --to mmdet --weights runs/soco/fpn_400ep/soco_weights.pth --out soco_mmdet.pth
CPU demo (SoCo vs random init in low-data fine-tuning; writes OUT/demo.json; about 7 CPU minutes at one thread):
    python soco.py --demo --seed 0 --out runs/soco_demo        # --demo-byol: also image-level BYOL
Benchmark (selective search, the 1.28M-image proposal table, CPU pre-training throughput):
    python benchmarks/bench_soco.py
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import math
import os
import re
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate
from torchvision import transforms as T
from torchvision.models import resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from common.augment import ColorAugment
from common.data import (ImageFolderDataset, build_detection_dataset, build_loader, detection_transforms,
                         fraction_split, save_split, subset_by_ids)
from common.demo import (DEMO_BOX_HEAD, DEMO_RECIPE, build_demo_detector, claim, evaluate_demo_detector,
                         train_demo_detector, write_demo_result)
from common.synthetic import SyntheticDetection
from common.detectors import C4Backbone, ResNetC5Head, build_detector, load_weights
from common.distributed import barrier, cleanup, init_distributed, is_main, seed_everything, unwrap, wrap_ddp
from common.engine import JsonlLogger, build_scheduler, load_checkpoint, resolve_resume, save_checkpoint, train_detector
from common.evaluation import evaluate_detector, evaluation_metric, format_ap
from common.table import RaggedTable

STAGES = ("pretrain", "proposals", "finetune", "export")
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SoCo", description="Selective Object COntrastive learning (SoCo, SoCo*)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", nargs="?", default="pretrain", choices=STAGES,
                   help="proposals (offline, once) -> pretrain (default) -> finetune, or export (for Detectron2 / MMDetection)")
    p.add_argument("--demo", action="store_true",
                   help="SoCo vs random init (and image-level BYOL) in low-data fine-tuning on synthetic data, CPU; "
                        "writes --out/demo.json")
    p.add_argument("--demo-byol", action="store_true",
                   help="with --demo: also image-level BYOL (Tab. 4 row 1) as a row without a claim (about 7 more CPU minutes)")

    h = p.add_argument_group("SoCo hyper-parameters (paper; defaults = the main setting)")
    h.add_argument("--arch", default="fpn", choices=("fpn", "c4"), help="SoCo-R50-FPN or SoCo-R50-C4, Sec. 4.1")
    h.add_argument("--backbone", default="resnet50", help="ResNet-50, Sec. 4.1")
    h.add_argument("--epochs", type=int, default=100, help="100 (ablations) or 400, Sec. 4.1")
    h.add_argument("--batch-size", type=int, default=2048, help="global batch, Sec. 4.1 / Tab. 5(b)")
    h.add_argument("--base-lr", type=float, default=1.0, help="lr = base-lr x batch / 256, Sec. 4.1")
    h.add_argument("--weight-decay", type=float, default=1e-5, help="Sec. 4.1")
    h.add_argument("--warmup-epochs", type=float, default=10, help="Sec. 4.1")
    h.add_argument("--lars-momentum", type=float, default=0.9, help="released code")
    h.add_argument("--trust-coeff", type=float, default=0.001, help="LARS trust coefficient, released code")
    h.add_argument("--tau", type=float, default=0.99, help="base target momentum, Sec. 4.1 / Tab. 5(d)")
    h.add_argument("--num-proposals", "-K", type=int, default=4, help="K proposals per image, Tab. 5(c)")
    h.add_argument("--view-size", type=int, default=224, help="V1 and V2 side, Sec. 3.2")
    h.add_argument("--v3-size", type=int, default=112, help="V3 side, Tab. 5(a)")
    h.add_argument("--v4-size", type=int, default=192, help="V4 side (SoCo*), Sec. 4.3")
    h.add_argument("--crop-scale", type=float, nargs=2, default=None,
                   help="V2 crop area range: default 0.5-1 (Sec. 3.2; release FPN) or 0.6-1 (release C4)")
    h.add_argument("--cutout-prob", type=float, default=0.0,
                   help="in-box cutout on V2/V3 per box (release's 100-epoch FPN and C4 recipes: 0.5; paper: none)")
    h.add_argument("--cutout-ratio", type=float, nargs=2, default=(0.1, 0.3), help="cutout area / box area (release)")
    h.add_argument("--v3-crop", default="downsample", choices=("downsample", "independent"),
                   help="V3 = V2 downsampled (paper) or an independent crop (released code)")
    h.add_argument("--star", action="store_true", help="SoCo*: add V4, a crop of V1 resized to --v4-size")
    h.add_argument("--jitter", type=float, default=0.1, help="box jitter r in [-j, j], Sec. 3.2")
    h.add_argument("--jitter-prob", type=float, default=0.5, help="Sec. 3.2")
    h.add_argument("--proj-hidden", type=int, default=4096, help="projector/predictor hidden width, Sec. 4.1")
    h.add_argument("--proj-dim", type=int, default=256, help="embedding width, Sec. 4.1")
    a = p.add_argument_group("ablations (Tab. 4, Tab. 5(c)); the paper's setting is the default")
    a.add_argument("--proposals-kind", default="selective_search", choices=("selective_search", "random", "whole"),
                   help="selective search boxes, random boxes (Tab. 5(c)), or the whole image (Tab. 4 row 1)")
    a.add_argument("--no-fpn", action="store_true", help="RoIAlign on C5 instead of P2-P5")
    a.add_argument("--no-head", action="store_true", help="average-pool RoIs instead of the R-CNN head")
    a.add_argument("--box-head", default="4conv1fc", choices=("4conv1fc", "2mlp"),
                   help="R-CNN head f^H: Mask R-CNN's 4conv1fc (Sec. 4.1) or two fc (the CPU demo's light head)")
    a.add_argument("--box-head-dim", type=int, default=1024, help="width of the 2mlp head (torchvision's 1024)")
    a.add_argument("--roi-sampling-ratio", type=int, default=0,
                   help="RoIAlign samples per bin in pre-training and fine-tuning (0: adaptive, Detectron2's ROIAlignV2)")
    a.add_argument("--no-scale-aware", action="store_true", help="FPN paper's level rule instead of Sec. 3.3's")
    a.add_argument("--no-jitter", action="store_true", help="no box jitter")
    a.add_argument("--no-v3", action="store_true", help="drop V3 (Tab. 4 'multi view')")

    s = p.add_argument_group("proposal stage (Sec. 3.2)")
    s.add_argument("--proposals", default="runs/soco/proposals", help="proposal table folder (written / read)")
    s.add_argument("--ss-mode", default="fast", choices=("fast", "quality"), help="OpenCV selective search mode")
    s.add_argument("--ss-workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="processes")
    s.add_argument("--ss-max-side", type=int, default=0, help="downscale longer side first (0: full resolution)")
    s.add_argument("--min-box-side", type=float, default=0.0, help="also drop boxes narrower than this (released: 32)")
    s.add_argument("--shard-size", type=int, default=1000, help="images per shard (the resume unit)")

    f = p.add_argument_group("fine-tuning (Sec. 4.2)")
    f.add_argument("--weights", default="", help="soco_weights.pth of a pre-training run ('' = random init)")
    f.add_argument("--det-data", default="synthetic", help="'synthetic', a COCO root or VOC root(s)")
    f.add_argument("--det-arch", default="mask_rcnn_fpn", choices=("mask_rcnn_fpn", "faster_rcnn_fpn", "faster_rcnn_c4"),
                   help="Mask R-CNN R50-FPN 4conv1fc (Tab. 1-2); Faster R-CNN R50-C4 for VOC (Tab. 3)")
    f.add_argument("--schedule", default="1x", choices=("1x", "2x", "voc"),
                   help="COCO 1x/2x (90k/180k it., x0.1 at 2/3, 8/9) or VOC (24k it., x0.1 at 3/4, 11/12)")
    f.add_argument("--det-iters", type=int, default=0, help="override the schedule's iterations")
    f.add_argument("--det-batch-size", type=int, default=16, help="global, Sec. 4.2")
    f.add_argument("--det-lr", type=float, default=0.02, help="at batch 16, Sec. 4.2")
    f.add_argument("--det-weight-decay", type=float, default=None, help="2.5e-5 COCO, 1e-4 VOC (Sec. 4.2)")
    f.add_argument("--det-norm", default="syncbn", choices=("syncbn", "bn", "frozen_bn", "gn"),
                   help="SyncBN in all layers, Sec. 4.2")
    f.add_argument("--fraction", type=float, default=1.0, help="labelled fraction (Mini COCO 0.05 / 0.1, Tab. 8)")
    f.add_argument("--train-split", default="", help="default: train2017 (COCO), trainval (VOC)")
    f.add_argument("--test-split", default="", help="default: val2017 (COCO), test (VOC)")
    f.add_argument("--det-scales", type=int, nargs="+", default=None, help="training short sides")
    f.add_argument("--det-max-size", type=int, default=1333)
    f.add_argument("--det-test-size", type=int, default=800)
    f.add_argument("--anchor-sizes", type=int, nargs="+", default=None, help="default torchvision's 32..512")
    f.add_argument("--box-batch-per-image", type=int, default=512, help="sampled RoIs per image (detectron2's 512)")
    f.add_argument("--test-proposals", type=int, default=1000, help="RPN boxes kept per test image (detectron2's 1000)")

    e = p.add_argument_group("export (the release's converters)")
    e.add_argument("--to", default="detectron2", choices=("detectron2", "mmdet"),
                   help="write --weights under Detectron2's (.pkl) or MMDetection's (.pth) key names to --out")

    g = p.add_argument_group("system")
    g.add_argument("--data", default="synthetic", help="'synthetic' or an ImageFolder root (its train/ is used)")
    g.add_argument("--synthetic-images", type=int, default=512, help="images of a synthetic set")
    g.add_argument("--synthetic-mode", default="unlabeled", choices=("unlabeled", "object"),
                   help="synthetic pre-training images: unlabelled scenes or object-centric images (ImageNet's role)")
    g.add_argument("--test-images", type=int, default=128, help="images of a synthetic test set (finetune)")
    g.add_argument("--image-size", type=int, default=128, help="side of synthetic images")
    g.add_argument("--out", default="runs/soco/pretrain", help="output folder")
    g.add_argument("--workers", type=int, default=8, help="data-loading workers per rank")
    g.add_argument("--accum-steps", type=int, default=1,
                   help="gradient accumulation: micro-batches per update (2 on 8 GPUs = the release's 128 per GPU)")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--amp", action="store_true",
                   help="mixed precision (Sec. 4.1 setting): float16 on CUDA, bfloat16 on the CPU")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", default="",
                   help="checkpoint.pth to continue from (must exist); 'auto': --out/checkpoint.pth if any, else fresh")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (schedules keep --epochs)")
    g.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=20)
    return p


# --------------------------------------------------------------------------------------------
# Model pieces (Sec. 3.3, 4.1)
# --------------------------------------------------------------------------------------------
class NoExtraLevel(ExtraFPNBlock):
    """P2-P5 only: "we do not use P6 due to its low resolution" (Sec. 3.3)."""

    def forward(self, results, x, names):
        return results, names


class _Body(nn.Module):
    """A ResNet up to C5 under the name `body`, so its tensors carry FPN detectors' `backbone.body.*`."""

    def __init__(self, resnet):
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, {"layer4": "0"})

    def forward(self, x):
        return self.body(x)


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Projector g / predictor q: linear 4096 + BN + ReLU + linear 256 (Sec. 4.1)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


class ObjectEncoder(nn.Module):
    """f^I (backbone + FPN), RoIAlign and f^H (R-CNN head): Eq. (1), h = f^H(RoIAlign(f^I(V), b)).

    Module names follow torchvision's detectors (`backbone.body`, `backbone.fpn`, `box_head`), so
    `transfer_state_dict` only prefixes `roi_heads.` to the head."""

    def __init__(self, arch: str = "fpn", backbone: str = "resnet50", fpn: bool = True, head: str | bool = "4conv1fc",
                 scale_aware: bool = True, view_size: int = 224, sampling_ratio: int = 0, head_dim: int = 1024):
        super().__init__()
        resnet = getattr(tv_resnet, backbone)(weights=None, norm_layer=nn.BatchNorm2d)
        self.scale_aware, self.view_size = scale_aware, view_size  # V1's side: the level thresholds' scale
        self.sampling_ratio = sampling_ratio  # RoIAlign samples per bin (0: adaptive, as ROIAlignV2)
        head = "4conv1fc" if head is True else (head or "none")
        if arch == "c4":  # Sec. 3.3: RoIAlign on C4, the whole res5 as the head
            self.strides, self.roi_size = (16,), 14  # 14x14 -> res5 -> 7x7, as the C4 detector
            self.backbone = C4Backbone(resnet)
            self.box_head = ResNetC5Head(resnet.layer4)
            self.out_dim = resnet.inplanes
            return
        self.roi_size = 7
        if fpn:
            self.backbone = _resnet_fpn_extractor(resnet, 5, returned_layers=[1, 2, 3, 4], extra_blocks=NoExtraLevel())
            self.strides, channels = FPN_STRIDES, self.backbone.out_channels
        else:
            self.backbone = _Body(resnet)
            self.strides, channels = (32,), resnet.inplanes
        if head == "4conv1fc":  # Mask R-CNN's 4conv1fc box head with BN
            self.box_head = FastRCNNConvFCHead((channels, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d)
            self.out_dim = 1024
        elif head == "2mlp":  # torchvision's two-fc head (the CPU demo's, at its width)
            self.box_head = TwoMLPHead(channels * 7 * 7, head_dim)
            self.out_dim = head_dim
        else:
            self.box_head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.out_dim = channels

    def levels(self, boxes: torch.Tensor) -> torch.Tensor:
        """Pyramid level of each box; the same pixel thresholds in every view, so a box in V3 (half
        the side) lands a level below the same box in V2: the scale augmentation of Sec. 3.3."""
        if len(self.strides) == 1:
            return torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
        if self.scale_aware:
            return assign_fpn_levels(boxes, self.view_size)
        return fpn_paper_levels(boxes, self.view_size)

    def forward(self, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S), boxes (B, K, 4) in view pixels -> h (B * K, out_dim)."""
        B, K, _ = boxes.shape
        feats = list(self.backbone(images).values())  # P2..P5, or C4 / C5
        flat = boxes.reshape(B * K, 4).float()
        batch_idx = torch.arange(B, device=boxes.device).repeat_interleave(K).to(flat.dtype)
        rois = torch.cat([batch_idx[:, None], flat], dim=1)  # (B * K, 5)
        level = self.levels(flat)  # (B * K,)
        pooled = feats[0].new_zeros(B * K, feats[0].shape[1], self.roi_size, self.roi_size)
        for lvl, (feat, stride) in enumerate(zip(feats, self.strides)):
            idx = torch.nonzero(level == lvl).squeeze(1)
            if idx.numel():
                out = roi_align(feat, rois[idx], self.roi_size, spatial_scale=1.0 / stride,
                                sampling_ratio=self.sampling_ratio, aligned=True)
                pooled = pooled.index_copy(0, idx, out.to(pooled.dtype))
        h = self.box_head(pooled)  # Eq. (1)
        # a level that got no box in this batch still joins the graph (zero gradient), so DDP finds
        # a gradient for every FPN output conv
        return h + 0.0 * sum(f.mean() for f in feats) if self.training and len(feats) > 1 else h


class SoCo(nn.Module):
    """Online network (encoder + projector g_theta + predictor q_theta) and its EMA target
    (encoder + projector g_xi, no predictor), Eq. (2-4)."""

    def __init__(self, arch="fpn", backbone="resnet50", fpn=True, head="4conv1fc", scale_aware=True,
                 proj_hidden=4096, proj_dim=256, view_size=224, sampling_ratio=0, head_dim=1024):
        super().__init__()
        encoder = ObjectEncoder(arch, backbone, fpn, head, scale_aware, view_size, sampling_ratio, head_dim)
        self.online = nn.ModuleDict({"encoder": encoder, "projector": mlp(encoder.out_dim, proj_hidden, proj_dim)})
        self.predictor = mlp(proj_dim, proj_hidden, proj_dim)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)

    def forward(self, views: list, boxes: list) -> dict:
        """views [V1, V2, (V3), (V4)] each (B, 3, S_v, S_v); boxes the same proposals in each view (B, K, 4)."""
        # Eq. (2), (4): online embeddings of every view, v_i = q(g(h_i))
        q = [self.predictor(self.online["projector"](self.online["encoder"](v, b))) for v, b in zip(views, boxes)]
        with torch.no_grad():  # Eq. (3), (4): target embeddings v'_i = g_xi(h'_i)
            z = [self.target["projector"](self.target["encoder"](v, b)) for v, b in zip(views, boxes)]
        # Eq. (5-6): online V1 against the target's V2, V3 (, V4) ...
        loss = soco_loss(q[0], *z[1:])
        # ... symmetrised (Sec. 3.3): V1 through the target, V2, V3 through the online network;
        # cos is symmetric, so sum_j -2 cos(q_j, z_1) = soco_loss(z_1, q_2, q_3).
        loss_sym = soco_loss(z[0], *q[1:])
        return {"loss_soco": loss + loss_sym}

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """xi <- tau xi + (1 - tau) theta, parameters only (released code)."""
        for p_o, p_t in zip(self.online.parameters(), self.target.parameters()):
            p_t.mul_(tau).add_(p_o.detach(), alpha=1.0 - tau)


def transfer_state_dict(model: SoCo) -> dict:
    """The online encoder under torchvision detector names (projector / predictor left out, Sec. 4.2):
    backbone.body.*, backbone.fpn.*, roi_heads.box_head.* (res5 as roi_heads.box_head.layer4.* for C4)."""
    out = {}
    for k, v in unwrap(model).online["encoder"].state_dict().items():
        out[("roi_heads." + k) if k.startswith("box_head.") else k] = v.detach().cpu().clone()
    return out


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (FPN level rule, canonical 224 at P4) with aligned=True, the
    half-pixel-corrected RoIAlign that pre-training pools with (Detectron2's ROIAlignV2, the
    release's fine-tuning pooler); torchvision's detectors pool with aligned=False."""

    def forward(self, x, boxes, image_shapes):
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(len(rois), dtype=torch.long)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for lvl, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels.to(rois.device) == lvl).squeeze(1)
            out[idx] = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                                 sampling_ratio=self.sampling_ratio, aligned=True).to(out.dtype)
        return out


def align_roi_pooling(detector: nn.Module, sampling_ratio: int = 0) -> nn.Module:
    """Swap a torchvision R-CNN's RoI poolers (box, and mask for Mask R-CNN) for aligned ones with
    `sampling_ratio`, so the transferred head sees features pooled as in pre-training (Sec. 4.2)."""
    heads = detector.roi_heads
    for name in ("box_roi_pool", "mask_roi_pool"):
        pool = getattr(heads, name, None)
        if pool is not None:
            setattr(heads, name, AlignedMultiScaleRoIAlign(pool.featmap_names, pool.output_size, sampling_ratio))
    return detector


# --------------------------------------------------------------------------------------------
# Losses and box rules (pure functions)
# --------------------------------------------------------------------------------------------
def assign_fpn_levels(boxes: torch.Tensor, view_size: int = 224) -> torch.Tensor:
    """Sec. 3.3 scale-aware assignment: sqrt(area) <= 48 -> P2 (0), <= 96 -> P3, <= 192 -> P4, else P5.
    The thresholds are for V1 = 224 px; `view_size` is V1's side when it is not 224 (they scale with it)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    s = torch.sqrt(wh[:, 0] * wh[:, 1]) * (224.0 / view_size)
    return (s > 48).long() + (s > 96).long() + (s > 192).long()


def fpn_paper_levels(boxes: torch.Tensor, view_size: int = 224) -> torch.Tensor:
    """FPN's rule (Lin et al. Eq. 1) k = floor(4 + log2(sqrt(wh) / 224)), clamped to P2..P5."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)
    s = torch.sqrt(wh[:, 0] * wh[:, 1]) * (224.0 / view_size)
    return (torch.floor(4 + torch.log2(s / 224.0)).clamp(2, 5) - 2).long()


def soco_loss(v: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
    """Eq. (5-6): mean over the K proposals of sum_t -2 cos(v, t); soco_loss(v, v2, v3) is the paper's."""
    v = F.normalize(v.float(), dim=-1)
    loss = sum(-2.0 * (v * F.normalize(t.float(), dim=-1)).sum(-1) for t in targets)  # Eq. (5)
    return loss.mean()  # Eq. (6)


def effective_rank(features: torch.Tensor) -> float:
    """Collapse check for (N, D) features: exp of the entropy of the normalised eigenvalues of their
    covariance (D when every direction is used equally, ~1 when all lie on one line)."""
    ev = torch.linalg.eigvalsh(torch.cov(features.T.double())).clamp(min=0)
    q = ev / ev.sum()
    return float(torch.exp(-(q * q.clamp(min=1e-12).log()).sum()))


def target_momentum(step: int, total_steps: int, base: float = 0.99) -> float:
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2: base at step 0, 1 at the last step (BYOL)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / max(1, total_steps)) + 1.0) / 2.0


def filter_proposals(boxes, width: float, height: float, min_side: float = 0.0):
    """Sec. 3.2: keep boxes (N, 4 x1 y1 x2 y2) with 1/3 <= w/h <= 3 and 0.3 <= sqrt(wh)/sqrt(WH) <= 0.8
    (and w, h >= min_side). Numpy or torch in, the kept rows out."""
    b = np.asarray(boxes.detach().cpu() if torch.is_tensor(boxes) else boxes, np.float64).reshape(-1, 4)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ok = (w > 0) & (h > 0) & (w >= min_side) & (h >= min_side)
    ratio = np.divide(w, h, out=np.zeros_like(w), where=ok)
    size = np.sqrt(np.clip(w * h, 0, None)) / math.sqrt(width * height)
    keep = ok & (ratio >= 1 / 3) & (ratio <= 3) & (size >= 0.3) & (size <= 0.8)
    return boxes[torch.from_numpy(keep)] if torch.is_tensor(boxes) else np.asarray(boxes).reshape(-1, 4)[keep]


def jitter_boxes(boxes: torch.Tensor, ratio: float, prob: float, generator=None) -> torch.Tensor:
    """Sec. 3.2 box jitter on (K, 4) x1 y1 x2 y2: centre + r w / r h, size (1 + r), r ~ U[-ratio, ratio]
    per coordinate, each box with probability `prob`."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    r = (torch.rand(boxes.shape[0], 4, generator=generator) * 2 - 1) * ratio
    r = r * (torch.rand(boxes.shape[0], 1, generator=generator) < prob)
    cx, cy, w, h = cx + r[:, 0] * w, cy + r[:, 1] * h, w * (1 + r[:, 2]), h * (1 + r[:, 3])
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def crop_boxes(boxes: torch.Tensor, crop, size: int) -> torch.Tensor:
    """Boxes of the parent view into a crop (top, left, h, w) resized to size x size, clipped to it."""
    top, left, ch, cw = crop
    scale = torch.tensor([size / cw, size / ch, size / cw, size / ch], dtype=boxes.dtype)
    return ((boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)) * scale).clamp(0, size)


# --------------------------------------------------------------------------------------------
# Object proposals: selective search, filter, compact storage (Sec. 3.2)
# --------------------------------------------------------------------------------------------
def selective_search(image: np.ndarray, mode: str = "fast", max_side: int = 0) -> np.ndarray:
    """OpenCV-contrib's selective search on an RGB uint8 (H, W, 3) image -> (N, 4) x1 y1 x2 y2 float32
    in the image's pixels."""
    import cv2

    scale = 1.0
    if max_side and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        image = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                           interpolation=cv2.INTER_AREA)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(image[:, :, ::-1]))  # OpenCV wants BGR
    ss.switchToSelectiveSearchFast() if mode == "fast" else ss.switchToSelectiveSearchQuality()
    rects = ss.process().astype(np.float32).reshape(-1, 4)  # x, y, w, h
    rects[:, 2:] += rects[:, :2]
    return rects / scale


def final_proposals(raw: np.ndarray, width: int, height: int, min_side: float = 0.0) -> np.ndarray:
    """The Sec. 3.2 filter, then the fallbacks (CHOICE): relaxed sizes, then the whole image."""
    kept = filter_proposals(raw, width, height, min_side)
    if len(kept) == 0:
        w, h = raw[:, 2] - raw[:, 0], raw[:, 3] - raw[:, 1]
        size = np.sqrt(np.clip(w * h, 0, None)) / math.sqrt(width * height)
        ratio = np.divide(w, h, out=np.zeros_like(w), where=h > 0)
        kept = raw[(ratio >= 1 / 3) & (ratio <= 3) & (size >= 0.1) & (size <= 1.0)]
    if len(kept) == 0:
        kept = np.array([[0, 0, width, height]], np.float32)
    return kept


def build_image_source(args):
    """The unlabelled images, indexable: synthetic scenes or an ImageFolder's train/ (ImageNet)."""
    if args.data == "synthetic":
        return SyntheticDetection(args.synthetic_images, args.image_size, mode=args.synthetic_mode,
                                  seed=args.seed)
    return ImageFolderDataset(Path(args.data) / "train")


def source_fingerprint(source) -> str:
    """Ties a proposal table to the image list it was made from."""
    if isinstance(source, SyntheticDetection):
        return f"synthetic:{source.mode}:{len(source)}:{source.size}:{source.seed}"
    names = "\n".join(source.relpath(i) for i in range(len(source)))
    return "sha1:" + hashlib.sha1(names.encode()).hexdigest()


_WORKER: dict = {}


def _init_proposal_worker(args) -> None:
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    _WORKER.update(source=build_image_source(args), args=args)


def _proposal_shard(task) -> int:
    """Proposals of images [start, end) into shard `index` of `table` (written whole, then renamed)."""
    table, index, start, end = task
    source, args = _WORKER["source"], _WORKER["args"]
    boxes, counts, sizes = [], [], []
    for i in range(start, end):
        image = source[i][0].permute(1, 2, 0).numpy()
        h, w = image.shape[:2]
        kept = final_proposals(selective_search(image, args.ss_mode, args.ss_max_side), w, h, args.min_box_side)
        kept = np.unique(np.round(kept).clip(0, 65535).astype(np.uint16), axis=0)  # integer boxes, no repeats
        boxes.append(kept)
        counts.append(len(kept))
        sizes.append((h, w))
    table.write_shard(index, counts, boxes=np.concatenate(boxes), sizes=np.asarray(sizes, np.int32))
    return end - start


def proposal_table(root) -> RaggedTable:
    """The final boxes of every image as a `common.table.RaggedTable` under `root`: boxes (M, 4)
    uint16 in original image pixels, sizes (N, 2) int32 (h, w); shards/<index>.npz while it is made.
    Opening costs milliseconds; DataLoader workers share the memory-mapped pages instead of copying
    per-image Python objects, and the table pickles without its arrays."""
    return RaggedTable(root, rows=("boxes",), images=("sizes",), what="proposal table",
                       hint=f"run `python soco.py proposals --data ... --proposals {root}` first")


def stage_proposals(args) -> RaggedTable:
    """Selective search over every image, sharded and resumable; then one flat table."""
    table = proposal_table(args.proposals)
    source = build_image_source(args)
    fingerprint = source_fingerprint(source)
    if table.complete:
        if table.meta.get("source") == fingerprint:
            print(f"proposal table {table.root} is complete ({len(table)} images, {table.meta['num_boxes']} boxes)")
            return table
        raise ValueError(f"{table.root} holds proposals of another image set ({table.meta.get('source')} != "
                         f"{fingerprint}); choose another --proposals folder")
    n, size = len(source), args.shard_size
    tasks = [(table, k, s, min(s + size, n)) for k, s in enumerate(range(0, n, size))]
    todo = [t for t in tasks if not table.shard_path(t[1]).is_file()]
    computed = sum(e - s for _, _, s, e in todo)
    print(f"selective search ({args.ss_mode}) on {n} images, {len(tasks)} shards ({len(tasks) - len(todo)} done), "
          f"{args.ss_workers} processes")
    t0 = time.perf_counter()
    with tqdm(total=n, initial=n - computed, desc="proposals", unit="img") as bar:
        if args.ss_workers <= 1:
            _init_proposal_worker(args)
            for t in todo:
                bar.update(_proposal_shard(t))
        else:
            with get_context("spawn").Pool(args.ss_workers, _init_proposal_worker, (args,)) as pool:
                for k in pool.imap_unordered(_proposal_shard, todo):
                    bar.update(k)
    elapsed = time.perf_counter() - t0
    meta = {"source": fingerprint, "ss_mode": args.ss_mode, "ss_max_side": args.ss_max_side,
            "min_box_side": args.min_box_side,
            "images_per_s_per_process": round(computed / elapsed / max(1, args.ss_workers), 3) if computed else None}
    table.merge_shards(len(tasks), meta)  # then the shards are deleted
    print(f"wrote {table.root}: {len(table)} images, {table.meta['num_boxes']} boxes "
          f"({table.meta['num_boxes'] / len(table):.1f} per image)")
    return table


# --------------------------------------------------------------------------------------------
# Views and augmentation (Sec. 3.2)
# --------------------------------------------------------------------------------------------
def blur_params(view_size: int) -> tuple[int, tuple[float, float]]:
    """BYOL's Gaussian blur at 224 px (sigma 0.1-2.0, kernel 23 px), both scaled by view_size / 224
    (V1's side, the same for every view: the release blurs its 112-px V3 with V2's sigma)."""
    r = view_size / 224
    return max(3, int(round(0.1 * view_size)) // 2 * 2 + 1), (0.1 * r, 2.0 * r)


def byol_augment(view_size: int, blur_p: float, solarize_p: float) -> v2.Compose:
    """BYOL's colour pipeline without its crop (the flip is done with the boxes): colour jitter
    (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, Gaussian blur for V1's side (`blur_params`) p=blur_p,
    solarize p=solarize_p, on the uint8 view with OpenCV's kernels (`common.augment.ColorAugment`:
    torchvision's draws, about 10x less CPU than its tensor kernels), then float and ImageNet
    normalisation."""
    kernel, sigma = blur_params(view_size)
    return v2.Compose([
        ColorAugment(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, gray_p=0.2, blur_kernel=kernel,
                     blur_sigma=sigma, blur_p=blur_p, solarize_p=solarize_p, solarize_threshold=128),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])


def cutout_in_boxes(img: torch.Tensor, boxes: torch.Tensor, prob: float, ratio=(0.1, 0.3)) -> torch.Tensor:
    """The release's RandomCutoutInBbox on a normalised (3, S, S) view: each box, with probability
    `prob`, gets a zeroed square of U(ratio) x its area centred on a random point inside it."""
    out = img.clone()
    S_h, S_w = img.shape[-2:]
    for x1, y1, x2, y2 in boxes.tolist():
        if torch.rand(1).item() >= prob:
            continue
        side = math.sqrt(float(torch.empty(1).uniform_(*ratio)) * (x2 - x1) * (y2 - y1))
        cx, cy = x1 + torch.rand(1).item() * (x2 - x1), y1 + torch.rand(1).item() * (y2 - y1)
        c1, r1 = max(0, int(round(cx - side / 2))), max(0, int(round(cy - side / 2)))
        c2, r2 = min(S_w, int(round(cx + side / 2))), min(S_h, int(round(cy + side / 2)))
        out[:, r1:r2, c1:c2] = 0.0  # the normalised image's mean colour
    return out


def random_proposals(width: int, height: int, k: int) -> np.ndarray:
    """Tab. 5(c) 'Random': k boxes drawn under the Sec. 3.2 constraints (aspect, relative size)."""
    side = math.sqrt(width * height) * (0.3 + 0.5 * torch.rand(k))
    aspect = torch.exp(math.log(3) * (2 * torch.rand(k) - 1))  # w / h in [1/3, 3], log-uniform
    w, h = (side * aspect.sqrt()).clamp(max=width), (side / aspect.sqrt()).clamp(max=height)
    x1, y1 = torch.rand(k) * (width - w), torch.rand(k) * (height - h)
    return torch.stack([x1, y1, x1 + w, y1 + h], 1).numpy()


def shared_region(crops: dict) -> tuple[torch.Tensor, bool]:
    """x1 y1 x2 y2 of the region every crop (top, left, h, w) covers, and whether it is not empty."""
    x1 = max(c[1] for c in crops.values())
    y1 = max(c[0] for c in crops.values())
    x2 = min(c[1] + c[3] for c in crops.values())
    y2 = min(c[0] + c[2] for c in crops.values())
    return torch.tensor([x1, y1, x2, y2], dtype=torch.float32), x2 - x1 >= 1 and y2 - y1 >= 1


def select_proposals(props: torch.Tensor, region: torch.Tensor, k: int) -> torch.Tensor:
    """K proposals (N, 4) drawn at random among those overlapping `region`, padded by repeats; the
    region itself when none does (CHOICE)."""
    x1, y1, x2, y2 = region.tolist()
    inside = ((props[:, 0] < x2) & (props[:, 2] > x1) & (props[:, 1] < y2) & (props[:, 3] > y1)
              & (props[:, 2] - props[:, 0] >= 1) & (props[:, 3] - props[:, 1] >= 1))
    cand = props[inside] if inside.any() else region[None]
    order = torch.randperm(len(cand))[:k]  # K random proposals per image per step
    if len(order) < k:
        order = torch.cat([order, torch.randint(len(cand), (k - len(order),))])
    return cand[order]


def clip_to_view(boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Boxes clipped to a size x size view, at least one pixel wide and high."""
    x1y1 = boxes[:, :2].clamp(0, size - 1)
    return torch.cat([x1y1, torch.maximum(boxes[:, 2:].clamp(max=size), x1y1 + 1)], 1)


class SoCoViews(Dataset):
    """Item i -> ([V1, V2, (V3), (V4)], [{"boxes": (K, 4)} per view]): the same K proposals in every view.

    V1: the image resized to view x view. V2: a random crop (area scale [0.5, 1], 0.6 for C4,
    aspect 3/4-4/3) of the image resized to view x view (the release crops the raw image). V3: V2
    downsampled to v3-size (or an independent crop). V4 (SoCo*): a crop resized to v4-size.
    Randomness comes from torch's generator, which `common.data.SeededDataset` seeds per
    (seed, epoch, index)."""

    def __init__(self, source, proposals: RaggedTable | None, args):
        if proposals is not None and len(proposals) != len(source):
            raise ValueError(f"the proposal table has {len(proposals)} images, the data {len(source)}")
        self.source, self.proposals, self.a = source, proposals, args
        self.k = 1 if args.proposals_kind == "whole" else args.num_proposals
        self.use_v3 = not args.no_v3 and args.arch != "c4"  # Sec. 3.3: C4 drops V3
        self.crop_scale = crop_scale(args)
        S = args.view_size  # blur follows V1's side in every view
        self.aug_v1 = byol_augment(S, blur_p=1.0, solarize_p=0.0)
        self.aug_v2 = self.aug_v3 = self.aug_v4 = byol_augment(S, blur_p=0.1, solarize_p=0.2)

    def __len__(self):
        return len(self.source)

    def _raw_boxes(self, i: int, width: int, height: int) -> np.ndarray:
        kind = self.a.proposals_kind
        if kind == "whole":
            return np.array([[0, 0, width, height]], np.float32)
        if kind == "random":
            return random_proposals(width, height, self.k)
        boxes = self.proposals[i]["boxes"].astype(np.float32)
        ph, pw = (int(v) for v in self.proposals.arrays["sizes"][i])
        if (ph, pw) != (height, width):  # table made at another resolution of the same image
            boxes = boxes * np.array([width / pw, height / ph, width / pw, height / ph], np.float32)
        return boxes

    def _crop(self, image):  # (top, left, h, w) in the image's pixels
        return T.RandomResizedCrop.get_params(image, scale=self.crop_scale, ratio=(3 / 4, 4 / 3))

    @staticmethod
    def _flip(img, boxes, size):
        if torch.rand(1).item() < 0.5:
            img = TF.horizontal_flip(img)
            boxes = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        return img, boxes

    def __getitem__(self, i: int):
        out_images, out_boxes = [], []
        for k, (img, b, aug) in enumerate(self.geometry(i)):  # each view randomly and independently augmented
            img, b = self._flip(img, b, img.shape[-1])
            img = aug(img)
            if k > 0 and self.a.cutout_prob > 0:  # the release: in-box cutout on V2, V3 (, V4)
                img = cutout_in_boxes(img, b, self.a.cutout_prob, tuple(self.a.cutout_ratio))
            out_images.append(img)
            out_boxes.append({"boxes": b})
        return out_images, out_boxes

    def _crops(self, image) -> tuple[dict, torch.Tensor]:
        """V2's crop (and V3's, V4's when they are independent crops) of the image, redrawn until
        they share a region (independent crops may not); that region, in the image's pixels."""
        for _ in range(10):
            crops = {"v2": self._crop(image)}
            if self.use_v3 and self.a.v3_crop == "independent":
                crops["v3"] = self._crop(image)
            if self.a.star:
                crops["v4"] = self._crop(image)
            region, ok = shared_region(crops)
            if ok:
                break
        return crops, region

    def geometry(self, i: int) -> list:
        """[(uint8 view, (K, 4) boxes in its pixels, its colour augmentation)] for V1, V2, (V3), (V4),
        step by step as Sec. 3.2 builds them."""
        a, S = self.a, self.a.view_size
        image = self.source[i][0]  # uint8 (3, H, W)
        H, W = image.shape[-2:]
        props = torch.as_tensor(self._raw_boxes(i, W, H), dtype=torch.float32)  # in image pixels
        # "The input image is resized to 224x224 to obtain V1"
        v1 = TF.resize(image, [S, S], antialias=True)
        to_v1 = torch.tensor([S / W, S / H, S / W, S / H])
        # "a random crop with a scale range of [0.5, 1.0] ... in generating V2" (of the image, as the release)
        crops, region = self._crops(image)
        # "object proposals outside of V2 are dropped": K of those inside every crop
        boxes = select_proposals(props, region, self.k)  # (K, 4) in image pixels
        b1 = boxes * to_v1
        if not a.no_jitter and a.proposals_kind != "whole":  # box jitter on V1's boxes (Sec. 3.2, release)
            b1 = jitter_boxes(b1, a.jitter, a.jitter_prob)
        views = [(v1, clip_to_view(b1, S), self.aug_v1)]
        # "V2 is then resized to the same size as V1"
        v2_img = TF.resized_crop(image, *crops["v2"], [S, S], antialias=True)
        b2 = crop_boxes(boxes, crops["v2"], S)
        views.append((v2_img, b2, self.aug_v2))
        if self.use_v3:  # "we downsample V2 to a fixed size (e.g. 112x112) to produce V3"
            s3 = a.v3_size
            if a.v3_crop == "downsample":
                views.append((TF.resize(v2_img, [s3, s3], antialias=True), b2 * (s3 / S), self.aug_v3))
            else:  # the release: an independent crop of the image
                views.append((TF.resized_crop(image, *crops["v3"], [s3, s3], antialias=True),
                              crop_boxes(boxes, crops["v3"], s3), self.aug_v3))
        if a.star:  # SoCo* (Sec. 4.3): V4, another crop, resized to 192
            s4 = a.v4_size
            views.append((TF.resized_crop(image, *crops["v4"], [s4, s4], antialias=True),
                          crop_boxes(boxes, crops["v4"], s4), self.aug_v4))
        return views


def crop_scale(args) -> tuple[float, float]:
    """V2's crop area range: --crop-scale, else the release's 0.5-1 (FPN) or 0.6-1 (C4)."""
    return tuple(args.crop_scale) if args.crop_scale else ((0.6, 1.0) if args.arch == "c4" else (0.5, 1.0))


# --------------------------------------------------------------------------------------------
# Pre-training (Sec. 4.1)
# --------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, lr: float, weight_decay: float, momentum: float, trust_coeff: float):
    """LARS (timm) over timm's weight-decay groups: biases and norm parameters (1-d) get weight
    decay 0, and timm's Lars adapts only groups with weight decay, so they get no adaptation either."""
    from timm.optim import Lars
    from timm.optim._param_groups import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    return Lars(groups, lr=lr, momentum=momentum, trust_coeff=trust_coeff)


def soco_step(model, views, targets) -> dict:
    """`common.engine.train_detector`'s loss_fn: the symmetrised SoCo loss of one batch."""
    return model(views, [t["boxes"] for t in targets])


def stage_pretrain(args, env) -> Path:
    out = Path(args.out)
    seed_everything(args.seed)  # same initial weights on every rank
    source = build_image_source(args)
    table = proposal_table(args.proposals) if args.proposals_kind == "selective_search" else None
    if table is not None and table.meta.get("source") != source_fingerprint(source):
        raise ValueError(f"proposal table {args.proposals} was made for {table.meta.get('source')}, "
                         f"not for --data {args.data} ({source_fingerprint(source)})")
    dataset = SoCoViews(source, table, args)
    # --batch-size is the paper's global batch; per rank and micro-batch = batch / (world x accum-steps);
    # lr = base-lr x batch / 256. Accumulated micro-batches keep the update, not BN's batch statistics.
    if args.batch_size % (env.world_size * args.accum_steps):
        raise ValueError(f"--batch-size {args.batch_size} does not split into {env.world_size} ranks x "
                         f"--accum-steps {args.accum_steps} equal micro-batches")
    per_rank = args.batch_size // (env.world_size * args.accum_steps)
    lr = args.base_lr * args.batch_size / 256
    loader = build_loader(dataset, per_rank, train=True, workers=args.workers, seed=args.seed,
                          collate_fn=default_collate, group_by_aspect_ratio=False)
    model = SoCo(args.arch, args.backbone, fpn=not args.no_fpn, head="none" if args.no_head else args.box_head,
                 scale_aware=not args.no_scale_aware, proj_hidden=args.proj_hidden, proj_dim=args.proj_dim,
                 view_size=args.view_size, sampling_ratio=args.roi_sampling_ratio, head_dim=args.box_head_dim)
    # SyncBN on more than one GPU (Sec. 4.1); PyTorch has no SyncBN on the CPU, where BN stays per rank
    model = wrap_ddp(model, env, sync_bn=env.distributed and env.device.type == "cuda")
    optimizer = build_optimizer(unwrap(model), lr, args.weight_decay, args.lars_momentum, args.trust_coeff)
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)  # updates
    total = args.epochs * steps_per_epoch
    scheduler = build_scheduler(optimizer, total, warmup_steps=int(args.warmup_epochs * steps_per_epoch),
                                warmup_factor=0.01, schedule="cosine")

    def momentum_update(step: int) -> None:  # after each optimizer step; step counts finished steps
        unwrap(model).update_target(target_momentum(step - 1, total, args.tau))

    def export(_epoch=None) -> None:  # the transferable weights, after every epoch and at the end
        save_checkpoint(out / "soco_weights.pth", {"model": transfer_state_dict(model), "args": vars(args)})

    if is_main():
        print(f"SoCo pre-training: {len(dataset)} images, {steps_per_epoch} steps/epoch x {args.epochs} epochs, "
              f"batch {args.batch_size} ({per_rank}/rank x {env.world_size} x {args.accum_steps} accumulated), "
              f"lr {lr:g}, K={dataset.k}")
    train_detector(model, loader, optimizer, scheduler, epochs=args.epochs, out_dir=out, args=args,
                   loss_fn=soco_step, amp=args.amp, checkpoint_every=args.checkpoint_every,
                   resume=resolve_resume(args.resume, out), log_every=args.log_every, max_steps=args.max_steps,
                   on_step_end=momentum_update, on_epoch_end=export, desc="soco", accumulate=args.accum_steps)
    export()
    barrier()
    return out / "soco_weights.pth"


# --------------------------------------------------------------------------------------------
# Transfer: fine-tuning and evaluation (Sec. 4.2)
# --------------------------------------------------------------------------------------------
SCHEDULES = {"1x": (90000, (2 / 3, 8 / 9), 2.5e-5, 1000), "2x": (180000, (2 / 3, 8 / 9), 2.5e-5, 1000),
             "voc": (24000, (3 / 4, 11 / 12), 1e-4, 100)}


DET_ARCHS = {"mask_rcnn_fpn": ("mask_rcnn", "4conv1fc"), "faster_rcnn_fpn": ("faster_rcnn_fpn", "4conv1fc"),
             "faster_rcnn_c4": ("faster_rcnn_c4", "2mlp")}  # --det-arch -> (common.detectors arch, box head)


def build_finetune_detector(args, num_classes: int) -> nn.Module:
    """The Sec. 4.2 detector: Mask R-CNN R50-FPN with the 4conv1fc head (Tab. 1-2, 4-5, 8), or Faster
    R-CNN (FPN, or C4 for VOC, Tab. 3), every layer trainable, RoIs pooled as in pre-training."""
    arch, box_head = DET_ARCHS[args.det_arch]
    model = build_detector(arch, num_classes, args.backbone, norm=args.det_norm, trainable_layers=5,
                           min_size=args.det_test_size, max_size=args.det_max_size, box_head=box_head,
                           anchor_sizes=args.anchor_sizes, box_batch_size_per_image=args.box_batch_per_image,
                           rpn_post_nms_top_n_test=args.test_proposals)
    return align_roi_pooling(model, args.roi_sampling_ratio)  # RoIAlign aligned=True, as in pre-training


def stage_finetune(args, env) -> dict:
    out = Path(args.out)
    seed_everything(args.seed)
    iters, fractions, wd, warmup = SCHEDULES[args.schedule]
    iters = args.det_iters or iters
    wd = args.det_weight_decay if args.det_weight_decay is not None else wd
    voc = args.schedule == "voc"
    scales = args.det_scales or (list(range(480, 801, 32)) if voc else list(range(640, 801, 32)))
    train_split = args.train_split or ("trainval" if voc else "train2017")
    test_split = args.test_split or ("test" if voc else "val2017")
    synth = dict(num_images=args.synthetic_images, image_size=args.image_size, seed=args.seed)
    masks = DET_ARCHS[args.det_arch][0] == "mask_rcnn"  # Mask R-CNN trains on the instance masks too
    if masks and evaluation_metric(args.det_data.split(",")[0]) != "coco":
        raise ValueError(f"--det-arch {args.det_arch} needs instance masks, which VOC ({args.det_data}) has none of: "
                         f"fine-tune on VOC with --det-arch faster_rcnn_c4 (Tab. 3) or faster_rcnn_fpn")
    train_set = build_detection_dataset(args.det_data, train_split, detection_transforms(True, scales, args.det_max_size),
                                        **synth, train=True, masks=masks)
    if args.fraction < 1:  # Mini COCO (Tab. 8): a seeded fraction of the training images
        labelled, _ = fraction_split(train_set, args.fraction, args.seed)
        if is_main():
            save_split(out / "split.json", {"labelled": labelled})
        train_set = subset_by_ids(train_set, labelled)
    test_data = args.det_data.split(",")[0]  # VOC07+12 trains on both, tests on VOC07
    test_set = build_detection_dataset(test_data, test_split, detection_transforms(False),
                                       **dict(synth, num_images=args.test_images))
    model = build_finetune_detector(args, len(train_set.classes))
    if args.weights:  # backbone, FPN and box head; the class-specific predictor stays random
        load_weights(model, args.weights, verbose=is_main())
    model = wrap_ddp(model, env)
    per_rank = args.det_batch_size // env.world_size
    loader = build_loader(train_set, per_rank, train=True, workers=args.workers, seed=args.seed)
    lr = args.det_lr * args.det_batch_size / 16
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    scheduler = build_scheduler(optimizer, iters, warmup_steps=min(warmup, iters // 4), warmup_factor=0.001,
                                schedule="step", milestones=[int(f * iters) for f in fractions])
    epochs = math.ceil(iters / len(loader))
    train_detector(model, loader, optimizer, scheduler, epochs=epochs, out_dir=out, args=args, amp=args.amp,
                   checkpoint_every=args.checkpoint_every, resume=resolve_resume(args.resume, out),
                   log_every=args.log_every, max_steps=iters, desc="finetune")
    test_loader = build_loader(test_set, 2, train=False, workers=args.workers)
    metrics = evaluate_detector(model, test_loader, env.device, metric=evaluation_metric(test_data))
    if is_main():
        JsonlLogger(out / "metrics.jsonl").log(eval=True, **metrics)
        print("  ".join(f"{k} {format_ap(metrics[k])}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                                                 "voc07_mAP50") if k in metrics))
    return dict(metrics, train_images=len(train_set))


# --------------------------------------------------------------------------------------------
# Export: the pre-trained backbone, FPN and box head under Detectron2's / MMDetection's names
# --------------------------------------------------------------------------------------------
def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key, n = re.subn(pattern, repl, key)
        if n:
            return key
    raise KeyError(key)


def _resnet_rules(prefix_in: str, prefix_out: str, stages: str, last: str = "") -> list:
    """torchvision ResNet names (conv1, bn1, layerN.b.convJ / bnJ / downsample.0-1) -> Detectron2's
    (stem.conv1(.norm), resN+1.b.convJ(.norm), shortcut(.norm)); `last` names the res5 prefix of C4."""
    p, q = re.escape(prefix_in), prefix_out
    stage = f"(layer[{stages}])"
    res = lambda m: f"res{int(m[1][-1]) + 1}"  # noqa: E731
    rules = [(rf"^{p}conv1\.weight$", f"{q}stem.conv1.weight"), (rf"^{p}bn1\.(\w+)$", rf"{q}stem.conv1.norm.\1")]
    for src, dst in ((r"conv(\d)\.weight", r"conv\3.weight"), (r"bn(\d)\.(\w+)", r"conv\3.norm.\4"),
                     (r"downsample\.0\.weight", r"shortcut.weight"), (r"downsample\.1\.(\w+)", r"shortcut.norm.\3")):
        rules.append((rf"^{p}{stage}\.(\d+)\.{src}$",
                      lambda m, dst=dst: q + res(m) + "." + m.expand(r"\2." + dst)))
    if last:
        for src, dst in ((r"conv(\d)\.weight", r"conv\2.weight"), (r"bn(\d)\.(\w+)", r"conv\2.norm.\3"),
                         (r"downsample\.0\.weight", r"shortcut.weight"), (r"downsample\.1\.(\w+)", r"shortcut.norm.\2")):
            rules.append((rf"^roi_heads\.box_head\.layer4\.(\d+)\.{src}$", lambda m, dst=dst: last + m.expand(r"\1." + dst)))
    return rules


def detectron2_state_dict(sd: dict) -> dict:
    """`transfer_state_dict`'s names -> Detectron2's: Mask / Faster R-CNN R50-FPN (backbone.bottom_up.*,
    backbone.fpn_lateral2-5 / fpn_output2-5, roi_heads.box_head.conv1-4(.norm) + fc1; fc1-2 for 2mlp)
    or R50-C4 (backbone.stem / res2-4, roi_heads.res5). What the release's convert_detectron2_Head.py /
    _C4.py write, under the full model names (no matching heuristics needed); BN's num_batches_tracked
    is left out, as in Detectron2's model zoo."""
    c4 = any(k.startswith("roi_heads.box_head.layer4.") for k in sd)
    if c4:
        rules = _resnet_rules("backbone.body.", "backbone.", "123", last="roi_heads.res5.")
    else:
        rules = _resnet_rules("backbone.body.", "backbone.bottom_up.", "1234") + [
            (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(weight|bias)$", lambda m: f"backbone.fpn_lateral{int(m[1]) + 2}.{m[2]}"),
            (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(weight|bias)$", lambda m: f"backbone.fpn_output{int(m[1]) + 2}.{m[2]}"),
            (r"^roi_heads\.box_head\.([0-3])\.0\.weight$", lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}.weight"),
            (r"^roi_heads\.box_head\.([0-3])\.1\.(\w+)$", lambda m: f"roi_heads.box_head.conv{int(m[1]) + 1}.norm.{m[2]}"),
            (r"^roi_heads\.box_head\.5\.(weight|bias)$", r"roi_heads.box_head.fc1.\1"),
            (r"^roi_heads\.box_head\.fc([67])\.(weight|bias)$", lambda m: f"roi_heads.box_head.fc{int(m[1]) - 5}.{m[2]}")]
    return {_rename(k, rules): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def mmdet_state_dict(sd: dict) -> dict:
    """`transfer_state_dict`'s names -> MMDetection's: ResNet as backbone.* (its names are
    torchvision's), FPN as neck.lateral_convs.i.conv / neck.fpn_convs.i.conv, the 4conv1fc head as
    roi_head.bbox_head.shared_convs.i.conv / .bn + shared_fcs.0 (Shared4Conv1FCBBoxHead; 2mlp:
    shared_fcs.0-1), C4's res5 as roi_head.shared_head.layer4.* (ResLayer): what the release's
    convert_mmdetection_*.py write."""
    rules = [(r"^backbone\.body\.(.*)$", r"backbone.\1"),
             (r"^backbone\.fpn\.inner_blocks\.(\d)\.0\.(weight|bias)$", r"neck.lateral_convs.\1.conv.\2"),
             (r"^backbone\.fpn\.layer_blocks\.(\d)\.0\.(weight|bias)$", r"neck.fpn_convs.\1.conv.\2"),
             (r"^roi_heads\.box_head\.([0-3])\.0\.weight$", r"roi_head.bbox_head.shared_convs.\1.conv.weight"),
             (r"^roi_heads\.box_head\.([0-3])\.1\.(\w+)$", r"roi_head.bbox_head.shared_convs.\1.bn.\2"),
             (r"^roi_heads\.box_head\.5\.(weight|bias)$", r"roi_head.bbox_head.shared_fcs.0.\1"),
             (r"^roi_heads\.box_head\.fc([67])\.(weight|bias)$", lambda m: f"roi_head.bbox_head.shared_fcs.{int(m[1]) - 6}.{m[2]}"),
             (r"^roi_heads\.box_head\.layer4\.(.*)$", r"roi_head.shared_head.layer4.\1")]
    return {_rename(k, rules): v for k, v in sd.items() if not k.endswith("num_batches_tracked")}


def stage_export(args) -> Path:
    """--weights (soco_weights.pth) -> --out: Detectron2 (pickle {"model": numpy arrays, "__author__",
    "matching_heuristics": False}; config: RESNETS.STRIDE_IN_1X1 False, INPUT.FORMAT RGB, torchvision's
    PIXEL_MEAN / STD, FPN.NORM "", ROI_BOX_HEAD 4 conv + 1 fc with NORM SyncBN, POOLER_TYPE ROIAlignV2,
    as the release's configs) or MMDetection (torch.save {"state_dict", "meta"}; ResNet style pytorch)."""
    import pickle

    if not args.weights:
        raise ValueError("export needs --weights (a soco_weights.pth written by pre-training)")
    sd = load_checkpoint(args.weights)["model"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if args.to == "detectron2":
        with open(tmp, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in detectron2_state_dict(sd).items()}, "__author__": "soco.py",
                         "matching_heuristics": False}, f)
    else:
        torch.save({"state_dict": mmdet_state_dict(sd), "meta": {"source": str(args.weights)}}, tmp)
    os.replace(tmp, out)
    print(f"wrote {out} ({args.to} names) from {args.weights}")
    return out


# --------------------------------------------------------------------------------------------
# Demo: SoCo vs random init in low-data fine-tuning (Tab. 8's regime), synthetic images, CPU
# --------------------------------------------------------------------------------------------
# CHOICE (demo only, to fit a few CPU minutes; common.demo's recipe for the detector):
# - pre-training data: object-centric synthetic 64-px images (the recipe's pre-training images,
#   ImageNet's role; DEMO["pre_mode"] = "unlabeled" pre-trains on unlabelled scenes of the
#   fine-tuning domain instead, Tab. 9's COCO pre-training, measured in results/soco.md), their
#   selective-search proposals; views 48 / 24 px (V1, V2 / V3: the objects then have about the
#   size of the fine-tuning scenes' 13-35 px objects, and an update costs 2 CPU-s instead of 2.8
#   at 64 / 32), level thresholds and blur scaled with them; ResNet-18 + FPN +
#   the demo detector's light box head (two fc of 256, RoIAlign with one sample per bin) as f^H,
#   so that every tensor of it transfers; projector / predictor 1024 -> 256.
# - budget: 640 images x 12 epochs at batch 32 = 240 LARS updates (warm-up 1 epoch, cosine).
# - LARS at batch 32: lr = base-lr x 32 / 256 = 0.125 (the paper's linear rule) with trust
#   coefficient 0.004, so that an update moves each weight by lr x trust = 0.0005 of its norm (the
#   paper's lr 8 x 0.001 at batch 2048 is 0.008). Keeping the paper's 0.008 (trust 0.064) at batch
#   32 collapsed the encoder within 40 updates (effective rank of C5 ~6 of 512, never recovering;
#   fine-tuning AP50 a third of random init's); at 0.004 the rank of pooled object features
#   recovers and their k-NN beats random init's after ~200 updates, but per position on scenes the
#   rank still falls (C5 29-38 of 512 after 240 updates, image-level BYOL's 20-21; 7-8 after 800
#   on in-domain scenes) and fine-tuning ends level with random init or below it
#   (results/soco.md). The paper's own 0.001 (0.000125 a step) barely moves the weights in a CPU
#   budget.
# - fine-tuning: Faster R-CNN R18-FPN of common.demo (the light head, RoIAlign aligned as in
#   pre-training) on a 5% labelled split of 1,000 scenes (50 images), the recipe's AdamW and its
#   150 steps, from SoCo and from random init; COCO AP on 300 held-out scenes. `--demo-byol` adds
#   image-level BYOL (`--proposals-kind whole`, Tab. 4 row 1, the same pre-training budget) as a
#   row without a claim (one more pre-training and fine-tuning: about 7 more CPU minutes).
# - every stage prints its wall and CPU seconds (at one thread CPU seconds are what an idle
#   machine's wall time would be; a loaded machine's wall time is not), kept in demo.json.
DEMO = dict(pre_images=640, pre_mode="object", epochs=12, batch_size=32, view_size=48, v3_size=24, trust_coeff=0.004,
            proj_hidden=1024, scenes=1000, fraction=0.05, ft_steps=150, test_scenes=300)
# With --demo these flags, given explicitly, replace DEMO's value (the LR follows --batch-size by
# the paper's linear rule, the trust coefficient stays DEMO's unless given) ...
DEMO_FLAGS = ("epochs", "batch_size", "trust_coeff", "view_size", "v3_size", "proj_hidden")
# ... and these the demo sets itself, so giving one with --demo is an error (with the fine-tuning
# and export groups' flags: the demo fine-tunes common.demo's detector at its recipe).
DEMO_SETS = ("stage", "arch", "backbone", "warmup_epochs", "box_head", "box_head_dim", "roi_sampling_ratio",
             "proposals_kind", "proposals", "ss_workers", "shard_size", "data", "synthetic_images", "synthetic_mode",
             "test_images", "image_size", "workers", "device", "amp", "max_steps", "checkpoint_every", "log_every")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; with --demo, `demo_overrides` holds the DEMO_FLAGS given explicitly, and a
    flag the demo sets itself stops with an error instead of being ignored."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if args.demo:
        unset = object()
        probe = get_args_parser()
        probe.set_defaults(**{a.dest: unset for a in probe._actions})
        given = {k for k, v in vars(probe.parse_args(argv)).items() if v is not unset}
        own = set(DEMO_SETS) | {a.dest for g in parser._action_groups if g.title.startswith(("fine-tuning", "export"))
                                for a in g._group_actions}
        if given & own:
            parser.error(f"--demo sets {', '.join('--' + k.replace('_', '-') for k in sorted(given & own))} itself "
                         f"(the demo recipe in the header): drop them, or run the stages without --demo")
        args.demo_overrides = {k: getattr(args, k) for k in DEMO_FLAGS if k in given}
    return args


def demo_settings(args) -> dict:
    """DEMO with the DEMO_FLAGS given on the command line (see parse_args)."""
    return {**DEMO, **getattr(args, "demo_overrides", {})}


class StageClock:
    """Wall and CPU (process) seconds of each demo stage, printed as each ends."""

    def __init__(self):
        self.stages: dict = {}

    def __call__(self, name: str, fn, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.stages[name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        print(f"[stage] {name}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
        return out


def demo_pretrain_args(args, root: Path, kind: str, seed: int) -> argparse.Namespace:
    """stage_proposals / stage_pretrain arguments for SoCo (or image-level BYOL for kind="whole") at the demo's budget."""
    d = demo_settings(args)
    return argparse.Namespace(**dict(
        vars(args), demo=False, data="synthetic", synthetic_images=d["pre_images"], image_size=64,
        synthetic_mode=d["pre_mode"], seed=seed, backbone="resnet18", workers=0, resume=args.resume, log_every=10,
        checkpoint_every=0, max_steps=None, amp=False, device="cpu", proposals=str(root / "proposals"),
        ss_workers=1, shard_size=64, out=str(root / f"pretrain_{kind}"), epochs=d["epochs"],
        batch_size=d["batch_size"], warmup_epochs=1, view_size=d["view_size"], v3_size=d["v3_size"],
        trust_coeff=d["trust_coeff"], proj_hidden=d["proj_hidden"], box_head="2mlp",
        box_head_dim=DEMO_BOX_HEAD["representation_size"], roi_sampling_ratio=DEMO_BOX_HEAD["roi_sampling_ratio"],
        proposals_kind=kind))


def demo_finetune(name: str, weights, train_set, test, steps: int, seed: int, clock, lr: float | None = None) -> dict:
    """The demo detector fine-tuned `steps` steps on train_set from `weights` (a soco_weights.pth
    path or state dict; None: random init) at peak LR `lr` (None: common.demo's recipe) and scored
    on `test`: AP50 / AP / AP75 and what transferred."""
    torch.manual_seed(seed)  # the same head / predictor init for every row
    model = align_roi_pooling(build_demo_detector(len(train_set.classes)), DEMO_BOX_HEAD["roi_sampling_ratio"])
    loaded = {}
    if weights is not None:  # what transfers: backbone, FPN, box head (the predictor and RPN stay random)
        report = load_weights(model, weights, verbose=False)
        kept = sorted({".".join(k.split(".")[:2]) for k in report.missing + [k for k, _ in report.skipped]})
        loaded = {"tensors_transferred": len(report.loaded), "left_at_init": kept}
        print(f"{name}: {len(report.loaded)} tensors transferred; left at init: {', '.join(kept)}")
    wall = clock(f"fine-tuning from {name}", train_demo_detector, model, train_set, steps, seed=seed, lr=lr)
    m = clock(f"evaluation of {name}", evaluate_demo_detector, model, test)
    print(f"{name}: AP50 {m['AP50']:.3f} AP {m['AP']:.3f}")
    return {"AP50": m["AP50"], "AP": m["AP"], "AP75": m["AP75"], "train_s": round(wall, 1), **loaded}


def run_demo(args, env) -> dict:
    """Pre-train SoCo (and, with --demo-byol, image-level BYOL) on unlabelled images, fine-tune the
    demo detector from each and from random init on 50 labelled scenes, write OUT/demo.json."""
    d, s = demo_settings(args), args.seed
    root = Path(args.out if args.out != get_args_parser().get_default("out") else "runs/soco_demo")
    clock, t0 = StageClock(), time.perf_counter()
    soco_args = demo_pretrain_args(args, root, "selective_search", 1000 * s + 1)
    clock("proposals (selective search)", stage_proposals, soco_args)
    weights = {"SoCo": clock("pre-training SoCo", stage_pretrain, soco_args, env)}
    if args.demo_byol:
        byol_args = demo_pretrain_args(args, root, "whole", 1000 * s + 1)
        weights["BYOL (whole image)"] = clock("pre-training BYOL (whole image)", stage_pretrain, byol_args, env)
    size = DEMO_RECIPE["scene_size"]
    scenes = SyntheticDetection(d["scenes"], size, mode="scenes", seed=1000 * s + 3)
    test = SyntheticDetection(d["test_scenes"], size, mode="scenes", seed=1000 * s + 4)
    labelled, _ = fraction_split(scenes, d["fraction"], seed=s)
    train_set = subset_by_ids(scenes, labelled)
    results = {name: demo_finetune(name, w, train_set, test, d["ft_steps"], s, clock)
               for name, w in (("random init", None), *weights.items())}
    wall = time.perf_counter() - t0
    t_pre = clock.stages["pre-training SoCo"]
    print(f"\nSoCo demo (seed {s}; SoCo pre-training {t_pre['wall_s']:.0f} s wall / {t_pre['cpu_s']:.0f} s CPU, "
          f"total {wall:.0f} s wall / {sum(v['cpu_s'] for v in clock.stages.values()):.0f} s CPU in the stages): "
          f"{d['pre_images']} object-centric images x {d['epochs']} epochs, then {len(train_set)} labelled scenes x "
          f"{d['ft_steps']} steps")
    print(f"{'init':<20} {'AP50':>6} {'AP':>6} {'AP75':>6}")
    for name, m in results.items():
        print(f"{name:<20} {100 * m['AP50']:6.1f} {100 * m['AP']:6.1f} {100 * m['AP75']:6.1f}")
    claims = [claim("SoCo > random init in low-data fine-tuning", "AP50", ("SoCo", results["SoCo"]["AP50"]),
                    ("random init", results["random init"]["AP50"]))]
    updates = d["epochs"] * math.ceil(d["pre_images"] / d["batch_size"])
    tables = {"finetune": results, "labelled_images": len(train_set), "test_images": len(test),
              "pretrain": {"images": d["pre_images"], "epochs": d["epochs"], "batch_size": d["batch_size"],
                           "updates": updates, "view_sizes": [d["view_size"], d["view_size"], d["v3_size"]],
                           "lr": args.base_lr * d["batch_size"] / 256, "trust_coeff": d["trust_coeff"],
                           "wall_s": t_pre["wall_s"], "cpu_s": t_pre["cpu_s"]},
              "stages": clock.stages, "threads": torch.get_num_threads()}
    write_demo_result(root, "soco.py", s, wall, claims, tables)
    return results


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------
def main(args) -> None:
    if args.demo:
        env = init_distributed("cpu")
        run_demo(args, env)
    elif args.stage == "proposals":
        stage_proposals(args)
        return
    elif args.stage == "export":
        stage_export(args)
        return
    else:
        env = init_distributed(args.device)
        if args.stage == "pretrain":
            stage_pretrain(args, env)
        else:
            stage_finetune(args, env)
    cleanup()


if __name__ == "__main__":
    main(parse_args())
