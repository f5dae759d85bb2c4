"""common.evaluation: VOC devkit conventions on hand-computed cases, COCO against pycocotools."""
import numpy as np
import pytest
import torch

from common.synthetic import SyntheticDetection
from benchmarks.bench_common import plain_pycocotools
from common.evaluation import (coco_evaluate, evaluate_predictions, evaluation_metric, voc_ap, voc_evaluate,
                               voc_summarize)


def _img(boxes, labels, scores=None, difficult=None):
    d = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels)}
    if scores is not None:
        d["scores"] = torch.tensor(scores, dtype=torch.float32)
    if difficult is not None:
        d["difficult"] = torch.tensor(difficult)
    return d


# One image, class 1: A and B normal, C difficult. Detections in score order: a hit on A (TP), a
# duplicate on A (FP), a hit on C (ignored), a hit on B (TP). Cumulative tp = 1 1 1 2, fp = 0 1 1 1.
GT = _img([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1], difficult=[False, False, True])
DET = _img([[0, 0, 10, 10], [1, 0, 10, 10], [40, 40, 50, 50], [20, 20, 30, 30]], [1, 1, 1, 1], [0.9, 0.8, 0.7, 0.6])


def test_voc_area_metric_hand_computed():
    # recall .5 .5 .5 1, precision 1 .5 .5 2/3 -> envelope 1 up to recall .5, 2/3 up to 1.
    assert voc_evaluate([DET], [GT])["mAP"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_voc07_metric_hand_computed():
    # t = 0 .. 0.5 (6 points) -> 1; t = 0.6 .. 1.0 (5 points) -> 2/3.
    assert voc_evaluate([DET], [GT], use_07_metric=True)["mAP"] == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_voc_difficult_only_class_is_not_scored_and_difficult_hits_are_neutral():
    gt = _img([[0, 0, 10, 10], [20, 20, 30, 30]], [1, 2], difficult=[False, True])
    det = _img([[20, 20, 30, 30], [0, 0, 10, 10]], [2, 1], [0.9, 0.8])
    out = voc_evaluate([det], [gt])
    assert set(out["AP"]) == {1} and out["mAP"] == pytest.approx(1.0)


def test_voc_iou_threshold_is_strict():
    gt = _img([[0, 0, 10, 10]], [1])
    exactly_half = _img([[0, 0, 10, 20]], [1], [1.0])  # IoU = 100 / 200
    assert voc_evaluate([exactly_half], [gt], 0.5)["mAP"] == 0.0
    assert voc_evaluate([exactly_half], [gt], 0.49)["mAP"] == 1.0


def test_voc_ap_interpolation_matches_devkit_on_a_curve():
    rec = np.array([0.1, 0.2, 0.2, 0.4, 0.65])
    prec = np.array([1.0, 1.0, 0.66, 0.75, 0.6])
    # area: 0.2 * 1 + 0.2 * 0.75 + 0.25 * 0.6
    assert voc_ap(rec, prec) == pytest.approx(0.2 + 0.15 + 0.15)
    # 07: t = 0, .1, .2 -> 1; .3, .4 -> .75; .5, .6 -> .6; .7 .. 1 -> 0
    assert voc_ap(rec, prec, True) == pytest.approx((3 + 2 * 0.75 + 2 * 0.6) / 11)


def test_voc_false_positive_in_image_without_that_class():
    gt = [_img([[0, 0, 10, 10]], [1]), _img([[0, 0, 5, 5]], [2])]
    det = [_img([[0, 0, 10, 10]], [1], [0.5]), _img([[0, 0, 5, 5]], [1], [0.9])]
    assert voc_evaluate(det, gt)["AP"][1] == pytest.approx(0.5)  # precision 1/2 at recall 1


# Detectron2's VOC AP set by hand. Class 1: A, B normal, C difficult; detections in score order: d1
# on A (IoU 1), d2 on B (IoU 100 / 150 = 2/3), d3 on C (IoU 1), d4 on A again (IoU 1).
GT3 = _img([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 1, 1], difficult=[False, False, True])
DET4 = _img([[0, 0, 10, 10], [20, 20, 35, 30], [40, 40, 50, 50], [0, 0, 10, 10]], [1, 1, 1, 1],
            [0.9, 0.8, 0.7, 0.6])


def test_voc_summarize_hand_computed():
    # IoU 0.50-0.65 (4 thresholds): tp 1 2 2 2, fp 0 0 0 1 (d3 neither, d4 a duplicate) -> recall
    # 1/2 1 1 1, precision 1 1 1 2/3: AP 1 by either metric. IoU 0.70-0.95 (6): d2 misses -> tp
    # 1 1 1 1, fp 0 1 1 2, recall stays 1/2: area AP 1/2; 07: t = 0 ... 0.5 -> 1, 0.6 ... 1 -> 0.
    area = voc_summarize([DET4], [GT3])
    assert area == pytest.approx({"AP": (4 * 1 + 6 * 0.5) / 10, "AP50": 1.0, "AP75": 0.5})
    v07 = voc_summarize([DET4], [GT3], use_07_metric=True, iou_thresholds=[0.3, 0.7])
    assert v07 == pytest.approx({"AP": (4 + 6 * 6 / 11) / 10, "AP50": 1.0, "AP75": 6 / 11,
                                 "AP@0.3": 1.0, "AP@0.7": 6 / 11})
    coco = coco_evaluate([DET4], [GT3])  # COCO-style: 101 points, the difficult box a positive
    assert coco["AP"] != pytest.approx(area["AP"]) and coco["AP75"] != pytest.approx(area["AP75"])


def test_voc_summarize_ignores_difficult_objects():
    without_d3 = {k: v[[0, 1, 3]] for k, v in DET4.items()}  # the hit on the difficult C removed
    assert voc_summarize([without_d3], [GT3]) == voc_summarize([DET4], [GT3])
    as_positive = dict(GT3, difficult=torch.tensor([False, False, False]))  # C counted: d3 a TP, npos 3
    assert voc_summarize([DET4], [as_positive])["AP50"] == pytest.approx(1.0)
    assert voc_summarize([DET4], [as_positive])["AP75"] == pytest.approx(1 / 3 + 1 / 3 * 2 / 3)
    only_difficult = _img([[0, 0, 10, 10]], [2], difficult=[True])  # a class with no positive: not scored
    assert voc_summarize([DET4, _img([[0, 0, 10, 10]], [2], [0.5])], [GT3, only_difficult]) == \
        voc_summarize([DET4], [GT3])


def test_evaluate_predictions_picks_the_metric(tmp_path):
    for name in ("VOC2007", "VOC2012", "coco"):
        (tmp_path / name / ("Annotations" if name != "coco" else "annotations")).mkdir(parents=True)
    assert evaluation_metric(str(tmp_path / "VOC2007")) == "voc07"
    assert evaluation_metric(f"{tmp_path / 'VOC2007'},{tmp_path / 'VOC2012'}") == "voc07"  # 07+12: tested on 07
    assert evaluation_metric(str(tmp_path / "VOC2012")) == "voc"
    assert evaluation_metric(str(tmp_path / "coco")) == evaluation_metric("synthetic") == "coco"
    m = evaluate_predictions([DET4], [GT3], "voc07")
    assert m["AP75"] == pytest.approx(6 / 11) and m["voc07_mAP50"] == m["AP50"] == 1.0
    assert m["voc_mAP50"] == voc_evaluate([DET4], [GT3])["mAP"]
    assert evaluate_predictions([DET4], [GT3], "voc")["AP75"] == pytest.approx(0.5)
    assert evaluate_predictions([DET4], [GT3]) == coco_evaluate([DET4], [GT3])
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_predictions([DET4], [GT3], "voc2007")


def _noisy_predictions(targets, seed=0):
    rng = np.random.default_rng(seed)
    preds = []
    for t in targets:
        b = np.asarray(t["boxes"], np.float64)
        n = len(b)
        jitter = rng.normal(0, 3, b.shape)
        fake = rng.uniform(0, 100, (3, 2))
        fake = np.concatenate([fake, fake + rng.uniform(5, 30, (3, 2))], 1)
        labels = np.concatenate([np.where(rng.random(n) < 0.85, t["labels"], rng.integers(1, 9, n)),
                                 rng.integers(1, 9, 3)])
        preds.append({"boxes": np.concatenate([b + jitter, fake]), "labels": labels,
                      "scores": rng.random(n + 3)})
    return preds


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_coco_matches_pycocotools_summarize(backend):
    ds = SyntheticDetection(40, 128, seed=3)
    targets = [ds.annotations(i) for i in range(len(ds))]
    preds = _noisy_predictions(targets)
    ours = coco_evaluate(preds, targets, backend=backend)

    ref = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], plain_pycocotools(preds, targets)[:6]))
    for k, v in ref.items():
        assert ours[k] == pytest.approx(v, abs=1e-12), k
    assert 0 < ours["AP"] < ours["AP50"] <= 1


def test_coco_extra_thresholds():
    ds = SyntheticDetection(20, 128, seed=4)
    targets = [ds.annotations(i) for i in range(len(ds))]
    preds = _noisy_predictions(targets, seed=1)
    out = coco_evaluate(preds, targets, iou_thresholds=[0.1, 0.5, 0.75, 0.9])
    assert out == coco_evaluate(preds, targets, [0.1, 0.5, 0.75, 0.9], backend="pycocotools")
    assert out["AP@0.5"] == pytest.approx(out["AP50"]) and out["AP@0.75"] == pytest.approx(out["AP75"])
    assert out["AP@0.1"] >= out["AP@0.5"] >= out["AP@0.9"]


def test_coco_perfect_and_empty():
    ds = SyntheticDetection(5, 128, seed=5)
    targets = [ds.annotations(i) for i in range(5)]
    perfect = [{"boxes": t["boxes"], "labels": t["labels"], "scores": np.ones(len(t["labels"]))} for t in targets]
    assert coco_evaluate(perfect, targets)["AP"] == pytest.approx(1.0)
    empty = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "scores": np.zeros(0)} for _ in targets]
    assert coco_evaluate(empty, targets)["AP"] == 0.0
    with pytest.raises(ValueError, match="one dict per image"):
        coco_evaluate(perfect[:2], targets)


class _FixedDetector(torch.nn.Module):
    """Returns the given predictions, one image per call, in loader order."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions, self.calls = predictions, 0

    def forward(self, images):
        out = self.predictions[self.calls:self.calls + len(images)]
        self.calls += len(images)
        return out


def test_evaluation_ground_truth_is_the_json_as_written(tmp_path):
    """A hand-made COCO JSON with a box running out of the image, a zero-width box, a crowd region
    and an image without annotations: evaluate_detector over the loader (train=False) gives
    pycocotools' own numbers on the JSON (boxes neither clipped nor dropped)."""
    import json
    from contextlib import redirect_stdout
    from io import StringIO

    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from common.data import build_detection_dataset, build_loader
    from common.evaluation import evaluate_detector

    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    images = [{"id": 10, "file_name": "a.png", "height": 64, "width": 64},
              {"id": 20, "file_name": "b.png", "height": 64, "width": 64}]
    for im in images:
        Image.new("RGB", (64, 64)).save(tmp_path / "val" / im["file_name"])
    gt = [([4, 4, 20, 20], 3, 0), ([50, 10, 30, 20], 3, 0),  # the second runs 16 px out of the image
          ([30, 40, 0, 10], 7, 0), ([0, 30, 30, 30], 7, 1), ([10, 40, 15, 15], 7, 0)]  # zero width, crowd
    anns = [{"id": k + 1, "image_id": 10, "category_id": c, "bbox": b, "area": float(b[2] * b[3]), "iscrowd": z}
            for k, (b, c, z) in enumerate(gt)]
    ann_file = tmp_path / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    dets = [(10, [4, 4, 20, 20], 3, 0.9), (10, [50, 10, 30, 20], 3, 0.8), (10, [1, 31, 28, 28], 7, 0.7),
            (10, [10, 40, 15, 15], 7, 0.6), (10, [30, 40, 2, 10], 7, 0.5), (20, [5, 5, 10, 10], 3, 0.95)]
    with redirect_stdout(StringIO()):
        coco = COCO(str(ann_file))
        ev = COCOeval(coco, coco.loadRes([{"image_id": i, "bbox": b, "category_id": c, "score": s}
                                          for i, b, c, s in dets]), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    label = {3: 1, 7: 2}
    predictions = [{"boxes": torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for i, b, _, _ in dets if i == im],
                                          dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor([label[c] for i, _, c, _ in dets if i == im]),
                    "scores": torch.tensor([s for i, _, _, s in dets if i == im])} for im in (10, 20)]
    dataset = build_detection_dataset(str(tmp_path), "val")
    loader = build_loader(dataset, 1, train=False, workers=0)
    ours = evaluate_detector(_FixedDetector(predictions), loader, torch.device("cpu"))
    for k, ref in zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], ev.stats[:6]):
        assert ours[k] == pytest.approx(ref, abs=1e-12), k
    assert 0 < ours["AP"] < 1
