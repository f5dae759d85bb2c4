"""COCO and VOC detection metrics, and distributed prediction with gathering.

Both metric functions take `predictions` and `targets`: lists with one dict per image, in the same
order. Predictions hold `boxes` (N, 4) x1 y1 x2 y2 in continuous 0-based pixels, `scores` (N) and
`labels` (N); targets hold `boxes`, `labels` and optionally `difficult` (VOC), `iscrowd` and `area`
(COCO). Metrics are fractions in [0, 1].
"""
from __future__ import annotations

from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch

from .distributed import all_gather_object, gather_object

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


def format_ap(value, digits: int = 1) -> str:
    """An AP (a fraction) as a table shows it: percent with `digits` decimals; "n/a" for COCO's -1
    (no ground truth in that area range) and for a metric the set does not have (None)."""
    return "n/a" if value is None or value < 0 else f"{100 * value:.{digits}f}"


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


def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (len(a), len(b)) of continuous x1 y1 x2 y2 boxes (VOC boxes are loaded as x1 - 1, y1 - 1:
    this is the devkit's IoU with its +1 on widths and heights)."""
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, np.finfo(np.float64).eps)


def _voc_matches(predictions, targets) -> dict:
    """For each class with non-difficult ground truth: its detections in descending score order,
    each with its best IoU over the ground truth of its class in its image (-inf: none there), the
    index of that object (unique over the whole set), whether it is difficult, and the class's
    number of non-difficult objects (`npos`). The devkit picks the best-overlapping object before
    it compares with the threshold, so this is computed once for every threshold."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: one dict per image each")
    npos, per_image, seen = {}, [], 0
    for p, t in zip(predictions, targets):
        gb, gl = _np(t["boxes"]).reshape(-1, 4), _np(t["labels"], np.int64)
        gd = _np(t.get("difficult", np.zeros(len(gl))), bool)
        for c, n in zip(*np.unique(gl[~gd], return_counts=True)):
            npos[int(c)] = npos.get(int(c), 0) + int(n)
        pb, ps, pl = _np(p["boxes"]).reshape(-1, 4), _np(p["scores"]), _np(p["labels"], np.int64)
        ious = _iou_matrix(pb, gb)
        ious[pl[:, None] != gl[None, :]] = -np.inf  # only the objects of the detection's class
        ious = np.concatenate([ious, np.full((len(pl), 1), -np.inf)], 1)  # a last column: "none"
        best = ious.argmax(1)  # the first of equal overlaps, as the devkit's np.argmax
        per_image.append((pl, ps, ious[np.arange(len(pl)), best], seen + best, np.append(gd, False)[best]))
        seen += len(gl) + 1
    if not per_image:
        return {}
    labels, scores, overlap, gt, difficult = (np.concatenate(x) for x in zip(*per_image))
    out = {}
    for c in sorted(npos):
        m = np.flatnonzero(labels == c)
        m = m[np.argsort(-scores[m], kind="stable")]
        out[c] = {"overlap": overlap[m], "gt": gt[m], "difficult": difficult[m], "npos": npos[c]}
    return out


def _voc_class_aps(matches: dict, iou_threshold: float, use_07_metric: bool) -> dict:
    """Devkit AP of every class of `_voc_matches` at one IoU threshold: a detection whose best
    overlap exceeds the threshold (strictly) is a true positive if it is that object's first
    (highest-scoring) detection and a false positive after; if that object is difficult it counts
    as neither; at or below the threshold it is a false positive."""
    aps = {}
    for c, m in matches.items():
        hit = m["overlap"] > iou_threshold
        counted = np.flatnonzero(hit & ~m["difficult"])
        tp = np.zeros(len(hit), bool)
        tp[counted[np.unique(m["gt"][counted], return_index=True)[1]]] = True  # first hit of each object
        fp = ~hit | (hit & ~m["difficult"] & ~tp)
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        aps[c] = voc_ap(tp / m["npos"], precision, use_07_metric) if len(hit) else 0.0
    return aps


def _voc_map(matches: dict, iou_threshold: float, use_07_metric: bool) -> float:
    ap = _voc_class_aps(matches, iou_threshold, use_07_metric)
    return float(np.mean(list(ap.values()))) if ap else 0.0


def voc_evaluate(predictions, targets, iou_threshold: float = 0.5, use_07_metric: bool = False) -> dict:
    """Pascal VOC AP per class and its mean over the classes that have non-difficult ground truth.

    A detection (in descending score order) is a true positive when its IoU with the best-overlapping
    ground truth of its class exceeds `iou_threshold` (strictly) and that ground truth is not yet
    matched; a second hit is a false positive; a best match that is difficult counts as neither."""
    ap = _voc_class_aps(_voc_matches(predictions, targets), iou_threshold, use_07_metric)
    return {"mAP": float(np.mean(list(ap.values()))) if ap else 0.0, "AP": ap}


VOC_IOUS = np.arange(50, 100, 5) / 100  # Detectron2's PascalVOCDetectionEvaluator: range(50, 100, 5)


def _voc_summary(matches: dict, use_07_metric: bool, iou_thresholds=None) -> dict:
    maps = [_voc_map(matches, float(t), use_07_metric) for t in VOC_IOUS]
    out = {"AP": float(np.mean(maps)), "AP50": maps[0], "AP75": maps[5]}
    for t in (float(t) for t in (iou_thresholds or [])):
        out[f"AP@{t:g}"] = _voc_map(matches, t, use_07_metric)
    return out


def voc_summarize(predictions, targets, use_07_metric: bool = False, iou_thresholds=None) -> dict:
    """VOC's AP set as Detectron2's `PascalVOCDetectionEvaluator` reports it: the devkit AP of
    `voc_evaluate` (difficult objects neither true nor false positives), averaged over the classes,
    at IoU 0.50, 0.55, ..., 0.95: "AP" is the mean of those ten, "AP50" and "AP75" two of them;
    `AP@{t}` the same at each t of `iou_thresholds`. `use_07_metric`: the VOC2007 11-point metric
    (Detectron2's choice when the set is VOC2007), else the area under the precision envelope."""
    return _voc_summary(_voc_matches(predictions, targets), use_07_metric, iou_thresholds)


# --------------------------------------------------------------------------------------------
# The metric of a test set
# --------------------------------------------------------------------------------------------
METRICS = ("coco", "voc", "voc07")


def evaluation_metric(data: str) -> str:
    """How a test set is scored, as Detectron2 picks its evaluator: "voc07" for a VOC root named
    VOC2007 (the 11-point metric: PascalVOCDetectionEvaluator's `year == 2007`), "voc" for another
    VOC-layout root (`<root>/Annotations`; the area metric), "coco" for a COCO root or synthetic
    data. `data` is a `build_detection_dataset` string; of comma-joined roots the first counts."""
    first = Path(str(data).split(",")[0])
    if (first / "Annotations").is_dir():
        return "voc07" if first.name == "VOC2007" else "voc"
    return "coco"


def evaluate_predictions(predictions, targets, metric: str = "coco", iou_thresholds=None) -> dict:
    """The AP set of `metric`: "coco" -> `coco_evaluate` (AP, AP50, AP75, APs, APm, APl); "voc" /
    "voc07" -> `voc_summarize` (AP, AP50, AP75 by the area / 11-point metric) plus `voc_mAP50` and
    `voc07_mAP50` (AP at IoU 0.5 by the area and by the 11-point metric: DAP's two VOC numbers).
    Both add `AP@{t}` for each t in `iou_thresholds`, by the same metric."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {METRICS}")
    if metric == "coco":
        return coco_evaluate(predictions, targets, iou_thresholds)
    matches = _voc_matches(predictions, targets)
    out = _voc_summary(matches, metric == "voc07", iou_thresholds)
    out["voc_mAP50"], out["voc07_mAP50"] = (_voc_map(matches, 0.5, use_07) for use_07 in (False, True))
    return out


# --------------------------------------------------------------------------------------------
# Running a detector over a (distributed) loader
# --------------------------------------------------------------------------------------------
_EVAL_KEYS = ("boxes", "labels", "scores", "difficult", "iscrowd", "area", "image_id", "image_label", "proposals")


def _to_cpu(d: dict) -> dict:
    """What evaluation needs, on the CPU (masks and other large fields are left behind)."""
    return {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in d.items() if k in _EVAL_KEYS}


@torch.no_grad()
def predict(model, loader, device, desc: str = "eval", dst: int | None = None):
    """Run `model` (eval mode) over a loader from `build_loader(..., train=False)`. Every rank
    predicts its shard; the results of all ranks are gathered, the DistributedSampler's padding
    removed, and returned in dataset order: (predictions, targets), one dict per image. `dst=None`:
    every rank receives them all; `dst=k`: rank k only (the others get two empty lists), for
    predictions too large to hold on every rank."""
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
    part = list(zip(indices, preds, tgts))
    gathered = all_gather_object(part) if dst is None else gather_object(part, dst)
    merged = {}
    for part in gathered:
        for i, p, t in part:
            merged.setdefault(i, (p, t))
    order = sorted(merged)
    return [merged[i][0] for i in order], [merged[i][1] for i in order]


def evaluate_detector(model, loader, device, iou_thresholds=None, metric: str = "coco") -> dict:
    """`predict`, then `evaluate_predictions` with `metric` ("coco", "voc", "voc07"; see
    `evaluation_metric` for a test set's)."""
    predictions, targets = predict(model, loader, device)
    return evaluate_predictions(predictions, targets, metric, iou_thresholds)
