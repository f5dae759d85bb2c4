"""COCO and VOC detection metrics, and distributed prediction with gathering.

Both metric functions take `predictions` and `targets`: lists with one dict per image, in the same
order. Predictions hold `boxes` (N, 4) x1 y1 x2 y2 in continuous 0-based pixels, `scores` (N) and
`labels` (N); targets hold `boxes`, `labels` and optionally `difficult` (VOC), `iscrowd` and `area`
(COCO). Metrics are fractions in [0, 1].
"""
from __future__ import annotations

from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import torch

from .distributed import all_gather_object

COCO_IOUS = np.linspace(0.5, 0.95, 10)


def _np(x, dtype=np.float64):
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


# --------------------------------------------------------------------------------------------
# COCO (pycocotools)
# --------------------------------------------------------------------------------------------
def coco_backend() -> str:
    """faster-coco-eval when installed (same C++ port of COCOeval: identical precision arrays, about
    9x faster on 5k images; see benchmarks/bench_common.py), otherwise pycocotools."""
    try:
        import faster_coco_eval  # noqa: F401
        return "faster_coco_eval"
    except ImportError:
        return "pycocotools"


def _coco_tables(predictions, targets):
    """COCO-format ground truth (a dict) and detections (an (N, 7) array: image, x, y, w, h, score,
    category) from the per-image lists."""
    images, anns, dets, labels = [], [], [], set()
    for img_id, (p, t) in enumerate(zip(predictions, targets), start=1):
        images.append({"id": img_id})
        boxes, lab = _np(t["boxes"]).reshape(-1, 4), _np(t["labels"], np.int64)
        crowd = _np(t.get("iscrowd", np.zeros(len(lab))), bool)
        area = t.get("area")
        area = _np(area) if area is not None and len(_np(area)) == len(lab) else None
        for k, (b, c) in enumerate(zip(boxes, lab)):
            w, h = b[2] - b[0], b[3] - b[1]
            anns.append({"id": len(anns) + 1, "image_id": img_id, "category_id": int(c),
                         "bbox": [float(b[0]), float(b[1]), float(w), float(h)],
                         "area": float(area[k]) if area is not None and area[k] > 0 else float(w * h),
                         "iscrowd": int(crowd[k])})
            labels.add(int(c))
        pb, ps, pl = _np(p["boxes"]).reshape(-1, 4), _np(p["scores"]), _np(p["labels"], np.int64)
        if len(pb):
            dets.append(np.column_stack([np.full(len(pb), img_id), pb[:, 0], pb[:, 1], pb[:, 2] - pb[:, 0],
                                         pb[:, 3] - pb[:, 1], ps, pl]))
    gt = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(labels)]}
    return gt, (np.concatenate(dets) if dets else None)


def _coco_precision(gt: dict, dets: np.ndarray, ious: np.ndarray, backend: str) -> np.ndarray:
    """COCOeval's accumulated precision array (T, R, K, A, M) at the IoU thresholds `ious`."""
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster as COCOeval
        extra = {"print_function": lambda *a, **k: None}
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        extra = {}
    with redirect_stdout(StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox", **extra)
        ev.params.iouThrs = ious
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"]


def coco_precision(predictions, targets, iou_thresholds=COCO_IOUS, backend: str | None = None):
    """COCOeval's accumulated precision array (T, R, K, A, M): IoU thresholds `iou_thresholds`,
    101 recall points, classes with ground truth (sorted labels), areas (all, small, medium,
    large), max detections (1, 10, 100); -1 where undefined. None when nothing can be scored (no
    detections or no ground truth). For precision-recall curves."""
    gt, dets = _coco_tables(predictions, targets)
    if dets is None or not gt["categories"]:
        return None
    return _coco_precision(gt, dets, np.asarray(iou_thresholds, np.float64), backend or coco_backend())


def coco_evaluate(predictions, targets, iou_thresholds=None, backend: str | None = None) -> dict:
    """COCO box AP. Returns AP, AP50, AP75, APs, APm, APl (identical to `COCOeval.summarize()`,
    including its -1 for an area range without ground truth) and, for each t in
    `iou_thresholds`, `AP@{t}`: AP at that single IoU, averaged over the classes with ground
    truth (100 detections per image, all areas). `backend`: "faster_coco_eval" or "pycocotools"
    (default: the first installed)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: one dict per image each")
    extra = [float(t) for t in (iou_thresholds or [])]
    keys = ["AP", "AP50", "AP75", "APs", "APm", "APl"] + [f"AP@{t:g}" for t in extra]
    ious = np.unique(np.round(np.concatenate([COCO_IOUS, extra]), 10))
    prec = coco_precision(predictions, targets, ious, backend)  # (T, R, K, A, M)
    if prec is None:
        return {k: 0.0 for k in keys}

    def mean_ap(t_idx, area=0):
        p = prec[t_idx, :, :, area, -1]
        p = p[p > -1]
        return float(p.mean()) if p.size else -1.0  # -1: no ground truth (pycocotools' convention)

    def t_index(t):
        return np.flatnonzero(np.isclose(ious, t))

    default = np.concatenate([t_index(t) for t in COCO_IOUS])
    out = {"AP": mean_ap(default), "AP50": mean_ap(t_index(0.5)), "AP75": mean_ap(t_index(0.75)),
           "APs": mean_ap(default, 1), "APm": mean_ap(default, 2), "APl": mean_ap(default, 3)}
    for t in extra:
        out[f"AP@{t:g}"] = mean_ap(t_index(t))
    return out


# --------------------------------------------------------------------------------------------
# Pascal VOC (the devkit's conventions; see IMPLEMENTATION_NOTES.md)
# --------------------------------------------------------------------------------------------
def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """VOC07: mean over t in 0, 0.1, ..., 1 of the max precision at recall >= t. Otherwise the area
    under the monotone (non-increasing) precision envelope."""
    if use_07_metric:  # the devkit's np.arange thresholds, float quirks included (0.6000000000000001)
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.arange(0.0, 1.1, 0.1)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou_one_to_many(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0, None)
    ih = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0, None)
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def voc_evaluate(predictions, targets, iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict:
    """Pascal VOC AP per class and its mean over the classes that have non-difficult ground truth.

    A detection (in descending score order) is a true positive when its IoU with the best-overlapping
    ground truth of its class exceeds `iou_threshold` (strictly) and that ground truth is not yet
    matched; a second hit is a false positive; a best match that is difficult counts as neither."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: one dict per image each")
    gts = []
    for t in targets:
        lab = _np(t["labels"], np.int64)
        diff = _np(t.get("difficult", np.zeros(len(lab))), bool)
        gts.append((_np(t["boxes"]).reshape(-1, 4), lab, diff))
    classes = sorted({int(c) for _, lab, diff in gts for c in lab[~diff]})
    ap = {}
    for c in classes:
        npos = sum(int(((lab == c) & ~diff).sum()) for _, lab, diff in gts)
        img_idx, scores, boxes = [], [], []
        for i, p in enumerate(predictions):
            pl = _np(p["labels"], np.int64)
            m = pl == c
            if m.any():
                img_idx.append(np.full(int(m.sum()), i))
                scores.append(_np(p["scores"])[m])
                boxes.append(_np(p["boxes"]).reshape(-1, 4)[m])
        if not scores:
            ap[c] = 0.0
            continue
        img_idx, scores, boxes = np.concatenate(img_idx), np.concatenate(scores), np.concatenate(boxes)
        order = np.argsort(-scores, kind="stable")
        matched = {}
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for d, j in enumerate(order):
            gb, gl, gd = gts[img_idx[j]]
            sel = np.flatnonzero(gl == c)
            if len(sel) == 0:
                fp[d] = 1
                continue
            ious = _iou_one_to_many(boxes[j], gb[sel])
            k = int(np.argmax(ious))
            if ious[k] > iou_threshold:
                if gd[sel[k]]:
                    continue  # matched a difficult object: neither TP nor FP
                used = matched.setdefault(int(img_idx[j]), set())
                if sel[k] in used:
                    fp[d] = 1
                else:
                    used.add(sel[k])
                    tp[d] = 1
            else:
                fp[d] = 1
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        recall = tp / npos
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap[c] = voc_ap(recall, precision, use_07_metric)
    return {"mAP": float(np.mean(list(ap.values()))) if ap else 0.0, "AP": ap}


# --------------------------------------------------------------------------------------------
# Running a detector over a (distributed) loader
# --------------------------------------------------------------------------------------------
_EVAL_KEYS = ("boxes", "labels", "scores", "difficult", "iscrowd", "area", "image_id", "image_label")


def _to_cpu(d: dict) -> dict:
    """What evaluation needs, on the CPU (masks and other large fields are left behind)."""
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in d.items() if k in _EVAL_KEYS}


@torch.no_grad()
def predict(model, loader, device, desc: str = "eval"):
    """Run `model` (eval mode) over a loader from `build_loader(..., train=False)`. Every rank
    predicts its shard; the results of all ranks are gathered, the DistributedSampler's padding
    removed, and returned in dataset order: (predictions, targets), one dict per image."""
    from tqdm import tqdm

    from .distributed import is_main

    was_training = model.training
    model.eval()
    indices = list(loader.batch_sampler.sampler)  # this rank's images, in iteration order
    preds, tgts = [], []
    for images, targets in tqdm(loader, desc=desc, disable=not is_main(), leave=False):
        out = model([im.to(device) for im in images])
        preds += [_to_cpu(o) for o in out]
        tgts += [_to_cpu(t) for t in targets]
    model.train(was_training)
    gathered = all_gather_object(list(zip(indices, preds, tgts)))
    merged = {}
    for part in gathered:
        for i, p, t in part:
            merged.setdefault(i, (p, t))
    order = sorted(merged)
    return [merged[i][0] for i in order], [merged[i][1] for i in order]


def evaluate_detector(model, loader, device, iou_thresholds=None, voc: bool = False) -> dict:
    """COCO metrics (plus `AP@{t}` for `iou_thresholds`) and, with `voc`, VOC mAP50 by the area
    metric (`voc_mAP50`) and the 07 11-point metric (`voc07_mAP50`)."""
    predictions, targets = predict(model, loader, device)
    metrics = coco_evaluate(predictions, targets, iou_thresholds)
    if voc:
        metrics["voc_mAP50"] = voc_evaluate(predictions, targets, 0.5)["mAP"]
        metrics["voc07_mAP50"] = voc_evaluate(predictions, targets, 0.5, use_07_metric=True)["mAP"]
    return metrics
