"""ssod_certainty.py: the contract functions against hand computations (encode/decode round trip,
Eq. 3.4, Eq. 3.6), the side losses, pseudo labels under per-class thresholds (including images left
with no box), the online class statistics, splits, smoke runs of teacher and student, a 2-process
torchrun and an exact resume of the student with its class statistics."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssod_certainty as sc
from common.data import detection_transforms, fraction_split
from common.synthetic import SyntheticDetection
from common.distributed import init_distributed
from common.engine import load_checkpoint
from conftest import record_autocast, run_torchrun

TINY = ["--data", "synthetic", "--synthetic-train", "20", "--synthetic-val", "4", "--synthetic-size", "64",
        "--labeled-fraction", "0.2", "--long-tail", "5", "--backbone", "resnet18", "--norm", "bn",
        "--trainable-layers", "5", "--min-size", "64", "--max-size", "64", "--train-scales", "64",
        "--anchor-sizes", "16", "32", "64", "128", "256", "--proposals", "50", "--roi-batch", "32",
        "--batch-size", "2", "--warmup-iters", "1", "--lr", "0.01", "--num-rare", "3", "--heldout-images", "4",
        "--workers", "0", "--device", "cpu", "--log-every", "1", "--pretrained", "none"]


def tiny_args(*extra):
    return sc.parse_args([*TINY, *map(str, extra)])


def peaked(bucket_targets, offset_targets, num_buckets):
    """Interval logits peaked at the targets and offsets holding them: (N, 4, K) each."""
    logits = torch.full((*bucket_targets.shape, num_buckets), -6.0)
    logits.scatter_(-1, bucket_targets.unsqueeze(-1), 6.0)
    offsets = torch.zeros_like(logits).scatter_(-1, bucket_targets.unsqueeze(-1), offset_targets.unsqueeze(-1))
    return logits, offsets


# ---------------------------------------------------------------- localisation as classification
def test_encode_hand_values():
    # proposal 0..10: x-segment of x1 is [5 - 8.5, 5] = [-3.5, 5] in 10 intervals of 0.85
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[0.0, -3.0, 10.0, 13.0]])
    buckets, offsets = sc.encode_sides(proposals, gt, num_buckets=10)
    assert buckets.dtype == torch.long and offsets.dtype == torch.float32
    assert buckets.shape == offsets.shape == (1, 4)
    # x1: (0 + 3.5) / 0.85 = 4.118 -> interval 4, offset 0.118 - 0.5; y1: 0.5 / 0.85 = 0.588 -> 0, +0.088
    # x2: (10 - 5) / 0.85 = 5.88 -> 5, +0.382; y2: 8 / 0.85 = 9.41 -> 9, -0.088
    assert buckets.tolist() == [[4, 0, 5, 9]]
    expected = torch.tensor([[3.5 / 0.85 - 4.5, 0.5 / 0.85 - 0.5, 5 / 0.85 - 5.5, 8 / 0.85 - 9.5]])
    assert torch.allclose(offsets, expected, atol=1e-5)


def test_encode_clamps_sides_outside_the_segment():
    proposals = torch.tensor([[10.0, 10.0, 20.0, 20.0]])
    gt = torch.tensor([[-50.0, 14.0, 90.0, 16.0]])  # x1 far left, x2 far right of their segments
    buckets, offsets = sc.encode_sides(proposals, gt, num_buckets=30)
    assert buckets[0, 0] == 0 and buckets[0, 2] == 29
    assert offsets[0, 0] < -0.5 and offsets[0, 2] > 0.5  # measured from the end interval's centre
    assert torch.isfinite(offsets).all()


@pytest.mark.parametrize("num_buckets", [4, 30])
def test_encode_decode_round_trip(num_buckets):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g) * 100
    wh = torch.rand(64, 2, generator=g) * 80 + 5
    proposals = torch.cat([xy, xy + wh], 1)
    # ground truth inside the segments: sides moved by up to 0.3 of the size, boxes kept non-empty
    jitter = (torch.rand(64, 4, generator=g) - 0.5) * 0.6 * wh.repeat(1, 2)
    gt = proposals + jitter
    buckets, offsets = sc.encode_sides(proposals, gt, num_buckets)
    assert ((offsets >= -0.5 - 1e-5) & (offsets <= 0.5 + 1e-5)).all()
    logits, offs = peaked(buckets, offsets, num_buckets)
    decoded = sc.decode_sides(proposals, logits, offs)
    assert decoded.shape == (64, 4)
    size = wh.repeat(1, 2)
    assert ((decoded - gt).abs() <= 1e-3 * size).all()


def test_decode_takes_the_best_interval_and_its_offset():
    proposals = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.zeros(1, 4, 10)
    logits[0, :, 2] = 3.0
    offsets = torch.zeros(1, 4, 10)
    offsets[0, :, 2] = 0.25
    offsets[0, :, 7] = 9.0  # another interval's offset is ignored
    # x1/y1: -3.5 + (2 + 0.5 + 0.25) * 0.85; x2/y2: 5 + 2.75 * 0.85
    assert torch.allclose(sc.decode_sides(proposals, logits, offsets),
                          torch.tensor([[-3.5 + 2.3375, -3.5 + 2.3375, 5 + 2.3375, 5 + 2.3375]]))


def test_localization_quality_eq_3_4():
    logits = torch.full((2, 4, 5), -100.0)
    logits[0, :, 1] = 0.0  # each side's max sigmoid 0.5
    logits[1, 0, 3] = math.log(3.0)  # sigmoid 0.75
    logits[1, 1, 0] = 0.0  # 0.5
    logits[1, 2, 4] = math.log(9.0)  # 0.9
    logits[1, 3, 2] = -math.log(3.0)  # 0.25
    v = sc.localization_quality(logits)
    assert v.shape == (2,)
    assert torch.allclose(v, torch.tensor([0.5, (0.75 + 0.5 + 0.9 + 0.25) / 4]))


# ---------------------------------------------------------------- Eq. 3.6
def test_dynamic_thresholds_eq_3_6_hand_values():
    sums, counts = torch.tensor([8.0, 2.0, 5.0]), torch.tensor([10.0, 4.0, 16.0])  # mean count 10
    tau_m, mu_m = sc.dynamic_thresholds(sums, counts, tau=0.7, gamma1=0.05, gamma2=0.6)
    expected_tau = torch.tensor([0.8 ** 0.05 * 0.7, 0.2 ** 0.05 * 0.7, 0.5 ** 0.05 * 0.7], dtype=torch.float64)
    expected_mu = torch.tensor([1.25 ** 0.6, 5.0 ** 0.6, 2.0 ** 0.6], dtype=torch.float64)
    assert torch.allclose(tau_m, expected_tau) and torch.allclose(mu_m, expected_mu)
    assert tau_m[1] < tau_m[2] < tau_m[0] and mu_m[1] > mu_m[2] > mu_m[0]  # rarer: lower tau, larger mu


def test_dynamic_thresholds_clip_and_switches():
    sums, counts = torch.tensor([100.0, 0.01]), torch.tensor([100.0, 1.0])
    tau_m, _ = sc.dynamic_thresholds(sums, counts, gamma1=1.0)
    assert tau_m.tolist() == [0.9, 0.4]  # clipped to [0.4, 0.9]
    tau_m, mu_m = sc.dynamic_thresholds(sums, counts, gamma1=0.0, gamma2=0.0)  # Table 3.7: 0 disables
    assert tau_m.tolist() == pytest.approx([0.7, 0.7]) and mu_m.tolist() == [1.0, 1.0]
    tau_m, _ = sc.dynamic_thresholds(sums, counts, tau=0.7, gamma1=1.0, clip=(0.1, 0.95))
    assert tau_m[0] == 0.95


def test_dynamic_thresholds_unseen_classes_are_finite():
    # class 3 never seen: it takes the rarest seen class's (class 2's) threshold and weight
    tau_m, mu_m = sc.dynamic_thresholds(torch.tensor([9.0, 1.0, 0.0]), torch.tensor([12.0, 3.0, 0.0]))
    assert torch.isfinite(mu_m).all() and tau_m[2] == tau_m[1] and mu_m[2] == mu_m[1]
    # nothing seen yet: the static threshold and weight 1
    tau_m, mu_m = sc.dynamic_thresholds(torch.zeros(4), torch.zeros(4), tau=0.7)
    assert tau_m.tolist() == pytest.approx([0.7] * 4) and mu_m.tolist() == [1.0] * 4


def test_class_statistics_update_and_state():
    stats = sc.ClassStatistics(3)
    stats.update(torch.tensor([1, 3, 3]), torch.tensor([0.5, 0.25, 0.75]))
    stats.update(torch.zeros(0, dtype=torch.long), torch.zeros(0))  # a step without foreground
    assert stats.score_sums.tolist() == [0.5, 0.0, 1.0] and stats.counts.tolist() == [1.0, 0.0, 2.0]
    copy = sc.ClassStatistics(3)
    copy.load_state_dict(stats.state_dict())
    assert torch.equal(copy.score_sums, stats.score_sums) and torch.equal(copy.counts, stats.counts)
    tau_m, mu_m = sc.class_thresholds(copy, tiny_args())
    assert torch.equal(tau_m, sc.dynamic_thresholds(stats.score_sums, stats.counts)[0])
    tau_m, mu_m = sc.class_thresholds(copy, tiny_args("--no-dynamic-threshold", "--no-reweight"))
    assert tau_m.tolist() == pytest.approx([0.7] * 3) and mu_m.tolist() == [1.0] * 3


# ---------------------------------------------------------------- losses
def test_side_losses_hand_values():
    logits = torch.zeros(1, 4, 3)
    offsets = torch.zeros(1, 4, 3)
    offsets[0, :, 1] = 0.3
    buckets = torch.ones(1, 4, dtype=torch.long)
    offset_t = torch.full((1, 4), 0.1)
    bce, reg = sc.side_losses(logits, offsets, buckets, offset_t, torch.tensor([2.0]), num_samples=4)
    # BCE at logit 0: log 2 per interval, 3 intervals x 4 sides, weight 2, / (4 x 4 RoIs)
    assert torch.isclose(bce, torch.tensor(2 * 12 * math.log(2) / 16))
    # SmoothL1 (beta 0.1) of 0.2 at the target interval: 0.2 - 0.05, 4 sides, weight 2, / 16
    assert torch.isclose(reg, torch.tensor(2 * 4 * 0.15 / 16))
    empty = sc.side_losses(torch.zeros(0, 4, 3), torch.zeros(0, 4, 3), torch.zeros(0, 4, dtype=torch.long),
                           torch.zeros(0, 4), torch.zeros(0), num_samples=8)
    assert all(float(x) == 0.0 for x in empty)


def test_weighted_classification_loss():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 3])
    ones = sc.classification_loss(logits, labels, torch.ones(5))
    assert torch.isclose(ones, F.cross_entropy(logits, labels))
    w = torch.tensor([1.0, 2.0, 1.0, 1.0, 0.5])
    assert torch.isclose(sc.classification_loss(logits, labels, w),
                         (w * F.cross_entropy(logits, labels, reduction="none")).mean())


# ---------------------------------------------------------------- detector and pseudo labels
def tiny_detector(certainty_aware=True):
    torch.manual_seed(0)
    flags = [] if certainty_aware else ["--no-certainty-aware"]
    return sc.build_ssod_detector(tiny_args(*flags), num_classes=8)


def synthetic_batch(n=2):
    ds = SyntheticDetection(n, 64, seed=3, transforms=detection_transforms(True, (64,), 64))
    images, targets = zip(*(ds[i] for i in range(n)))
    return list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


@pytest.mark.parametrize("certainty_aware", [True, False])
def test_empty_pseudo_boxes_give_finite_losses(certainty_aware):
    model = tiny_detector(certainty_aware).train()
    images, targets = synthetic_batch()
    targets[1] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                  "weights": torch.zeros(0), "loss_weight": 1.0}
    losses = model(images, targets)
    box_terms = {"loss_bucket", "loss_offset"} if certainty_aware else {"loss_box_reg"}
    assert box_terms <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # every image empty: still finite
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert all(torch.isfinite(v) for v in model(images, empty).values())


def test_foreground_rois_feed_class_statistics_and_weights_scale_losses():
    model = tiny_detector().train()
    stats = sc.ClassStatistics(8)
    images, targets = synthetic_batch()
    torch.manual_seed(1)
    base = model(images, targets)
    stats.update(*model.roi_heads.foreground)  # what the student step does after its forward
    n_fg = stats.counts.sum()
    assert n_fg > 0 and 0 < stats.score_sums.sum() < n_fg  # p * v in (0, 1) per foreground RoI
    seen = {int(c) for t in targets for c in t["labels"]}
    assert {i + 1 for i in torch.nonzero(stats.counts).flatten().tolist()} <= seen
    torch.manual_seed(1)
    doubled = model(images, [{**t, "weights": torch.full((len(t["labels"]),), 2.0)} for t in targets])
    # mu_m scales foreground terms only: the localisation terms double exactly
    assert torch.isclose(doubled["loss_bucket"], 2 * base["loss_bucket"])
    assert torch.isclose(doubled["loss_offset"], 2 * base["loss_offset"])
    torch.manual_seed(1)
    halved = model(images, [{**t, "loss_weight": 0.5} for t in targets])  # lambda_u: whole image
    assert torch.isclose(halved["loss_classifier"], 0.5 * base["loss_classifier"])
    assert torch.isclose(halved["loss_objectness"], base["loss_objectness"])  # RPN not scaled (CHOICE)


def test_inference_ranks_by_p_times_v():
    model = tiny_detector().eval()
    model.roi_heads.score_thresh = 0.0
    images, _ = synthetic_batch(1)
    with torch.no_grad():
        out = model(images)[0]
    assert set(out) >= {"boxes", "labels", "scores", "class_scores", "quality"}
    assert len(out["scores"]) > 0
    assert torch.allclose(out["scores"], out["class_scores"] * out["quality"])
    assert (out["labels"] >= 1).all() and (out["labels"] <= 8).all()
    assert (out["scores"][:-1] >= out["scores"][1:]).all()


class FixedTeacher(nn.Module):
    """Returns the same detections for every image (stands in for the teacher)."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        return [self.detections for _ in images]


def test_pseudo_labels_per_class_thresholds_and_empty_images():
    det = {"boxes": torch.tensor([[0, 0, 5, 5], [1, 1, 6, 6], [2, 2, 9, 9.0]]),
           "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.6, 0.45, 0.3])}
    tau_m = torch.tensor([0.5, 0.4])
    (kept,) = sc.pseudo_label(FixedTeacher(det), [torch.zeros(3, 8, 8)], tau_m)
    assert kept["labels"].tolist() == [1, 2] and kept["boxes"].shape == (2, 4)
    (none,) = sc.pseudo_label(FixedTeacher(det), [torch.zeros(3, 8, 8)], torch.tensor([0.9, 0.9]))
    assert none["boxes"].shape == (0, 4) and none["labels"].shape == (0,)
    assert sc.pseudo_label(FixedTeacher(det), [], tau_m) == []


def test_student_loss_with_no_pseudo_boxes_is_finite():
    model = tiny_detector().train()
    images, targets = synthetic_batch()
    nothing = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    targets[1] = {"weak_image": images[1]}  # an unlabelled image
    stats = sc.ClassStatistics(8)
    losses = sc.student_loss(model, images, targets, teacher=FixedTeacher(nothing), class_stats=stats,
                             args=tiny_args())
    assert all(torch.isfinite(v) for v in losses.values())
    assert stats.counts.sum() > 0  # the labelled image's foreground still counts


def test_student_step_logs_what_the_pseudo_labels_were():
    # issue 17 item 3: pseudo boxes per image, mean v, tau_m and mu_m per class are visible
    model = tiny_detector().train()
    images, targets = synthetic_batch()
    det = {"boxes": torch.tensor([[2, 2, 30, 30], [4, 4, 40, 40], [1, 1, 9, 9.0]]), "labels": torch.tensor([1, 2, 2]),
           "scores": torch.tensor([0.9, 0.8, 0.2]), "quality": torch.tensor([0.95, 0.9, 0.3])}
    targets[1] = {"weak_image": images[1]}
    stats, log = sc.ClassStatistics(8), sc.PseudoLabelLog()
    sc.student_loss(model, images, targets, teacher=FixedTeacher(det), class_stats=stats, args=tiny_args(), log=log)
    fields = log.fields()
    assert fields["pseudo_boxes_per_image"] == 2.0  # 0.9 and 0.8 pass tau = 0.7, 0.2 does not
    assert fields["pseudo_mean_v"] == pytest.approx(0.925) and fields["teacher_mean_v"] == pytest.approx(2.15 / 3)
    assert fields["tau_m"] == [0.7] * 8 and fields["mu_m"] == [1.0] * 8  # nothing seen before the first step
    assert log.fields()["pseudo_boxes_per_image"] == 0.0  # reset after each log line


# ---------------------------------------------------------------- data
def test_split_same_across_reruns_and_saved(tmp_path):
    args = tiny_args("--output-dir", tmp_path)
    train = SyntheticDetection(20, 64, seed=1)
    a = sc.make_split(args, train)
    b = sc.make_split(args, train)
    assert a == b and a == fraction_split(train, 0.2, 0)
    assert len(a[0]) == 4 and not set(a[0]) & set(a[1]) and len(a[0]) + len(a[1]) == 20
    saved = json.loads((tmp_path / "split_0.2_seed0.json").read_text())
    assert saved == {"labeled": a[0], "unlabeled": a[1]}
    args.split_file, args.seed = str(tmp_path / "split_0.2_seed0.json"), 5  # a saved split wins over the seed
    assert sc.make_split(args, train) == a


def test_strong_view_keeps_weak_geometry():
    args = tiny_args()
    labeled = SyntheticDetection(2, 64, seed=1)
    ds = sc.SemiSupervisedSet(labeled, SyntheticDetection(2, 64, seed=2), detection_transforms(True, (64,), 64),
                              sc.strong_augmentation(args))
    image, target = ds[0]
    assert set(target) == {"boxes", "labels", "image_id"}
    image, target = ds[3]
    assert set(target) == {"image_id", "weak_image"} and image.shape == target["weak_image"].shape
    off = sc.strong_augmentation(tiny_args("--no-color-jitter", "--no-blur", "--no-cutout"))
    assert torch.equal(off(image), image)


# ---------------------------------------------------------------- runs
def test_smoke_teacher_and_student(tmp_path):
    results = sc.main(tiny_args("--teacher-iters", "2", "--student-iters", "2", "--output-dir", tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in ("teacher", "teacher_heldout", "student"):
        assert {"AP", "AP50", "AP75", "AP_rare", "AP@0.5", "AP@0.95"} <= set(saved[key])
    assert len(saved["rare_labels"]) == 3 and len(saved["class_stats"]["tau_m"]) == 8
    assert (tmp_path / "fig3_2_ap_vs_iou.png").is_file()
    assert (tmp_path / "fig3_3_pseudo_box_localization.png").is_file()
    ckpt = load_checkpoint(tmp_path / "student" / "checkpoint.pth")
    assert ckpt["step"] == 2 and set(ckpt["extra"]) == {"class_stats", "teacher"}
    for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines():  # item 3: logged per step
        record = json.loads(line)
        assert {"pseudo_boxes_per_image", "pseudo_mean_v", "teacher_mean_v"} <= set(record)
        assert len(record["tau_m"]) == len(record["mu_m"]) == 8
    assert results["class_stats"]["counts"] == ckpt["extra"]["class_stats"]["counts"].tolist()


def test_resume_student_with_class_statistics(tmp_path, monkeypatch):
    flags = ("--teacher-iters", "2", "--student-iters", "4", "--heldout-images", "0")
    full, part = tmp_path / "full", tmp_path / "part"
    sc.main(tiny_args(*flags, "--output-dir", full))
    real = sc.train_detector
    monkeypatch.setattr(sc, "train_detector", lambda *a, **k: real(*a, **{**k, "max_steps": min(k["max_steps"], 2)}))
    sc.main(tiny_args(*flags, "--output-dir", part))  # the student "interrupted" after 2 of 4 steps
    assert load_checkpoint(part / "student" / "checkpoint.pth")["step"] == 2
    monkeypatch.setattr(sc, "train_detector", real)
    sc.main(tiny_args(*flags, "--output-dir", part, "--resume", part / "student" / "checkpoint.pth"))
    a, b = load_checkpoint(full / "student" / "checkpoint.pth"), load_checkpoint(part / "student" / "checkpoint.pth")
    assert b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in ("score_sums", "counts"):
        assert torch.equal(a["extra"]["class_stats"][k], b["extra"]["class_stats"][k]), k
    # the teacher continued from its own (finished) checkpoint: trained once, logged once
    assert [json.loads(l)["step"] for l in (part / "teacher" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        sc.main(tiny_args(*flags, "--output-dir", part, "--resume", tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match=r"several trainings.*under .*part"):  # not a checkpoint of this run
        sc.main(tiny_args(*flags, "--output-dir", part, "--resume", full / "student" / "checkpoint.pth"))


def test_amp_teacher_and_student_steps_on_the_cpu(tmp_path, monkeypatch):
    args = tiny_args("--teacher-iters", "1", "--student-iters", "1", "--amp", "--output-dir", tmp_path)
    env = init_distributed("cpu")
    labeled, unlabeled, _ = sc.build_datasets(args)
    dtypes = record_autocast(monkeypatch, sc)
    teacher = sc.train_teacher(args, env, len(labeled.classes), labeled, tmp_path / "teacher")
    sc.train_student(args, env, teacher, labeled, unlabeled, tmp_path / "student")
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # --amp on the CPU: bfloat16 autocast
    for stage in ("teacher", "student"):
        assert load_checkpoint(tmp_path / stage / "checkpoint.pth")["step"] == 1
        log = json.loads((tmp_path / stage / "metrics.jsonl").read_text())
        assert all(math.isfinite(v) for k, v in log.items() if k.startswith("loss")), log


def test_torchrun_two_processes(tmp_path):
    run_torchrun(["ssod_certainty.py", *TINY, "--batch-size", "4", "--teacher-iters", "2", "--student-iters", "2",
                  "--output-dir", tmp_path])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "AP" in saved["student"] and saved["class_stats"]["counts"]
    assert json.loads((tmp_path / "split_0.2_seed0.json").read_text())["labeled"] == \
        fraction_split(SyntheticDetection(20, 64), 0.2, 0)[0]


def test_flags_and_demo_defaults():
    p = sc.parse_args([])
    assert (p.num_buckets, p.tau, p.gamma1, p.gamma2, p.lambda_u) == (30, 0.7, 0.05, 0.6, 1.0)
    assert tuple(p.tau_clip) == (0.4, 0.9)
    assert (p.lr, p.batch_size, p.student_iters, p.certainty_aware, p.reweight, p.dynamic_threshold) == \
        (0.01, 8, 180_000, True, True, True)
    off = sc.parse_args(["--no-certainty-aware", "--no-reweight", "--no-dynamic-threshold", "--no-cutout"])
    assert not (off.certainty_aware or off.reweight or off.dynamic_threshold or off.cutout)
    d = sc.parse_args(["--demo", "--student-iters", "3", "--out", "runs/x"])
    assert d.student_iters == 3 and d.backbone == "resnet18" and d.device == "cpu" and d.long_tail == 4
    assert d.output_dir == "runs/x" and d.num_buckets == 8 and d.pretrained == "imagenet-standin"
    assert d.demo_backbone_steps == 400 and (d.teacher_iters, d.student_iters) == (300, 3)
    with pytest.raises(SystemExit):  # the stand-in exists only in the demo
        sc.parse_args(["--pretrained", "imagenet-standin"])
    assert isinstance(d, argparse.Namespace)


def test_demo_writes_its_two_claims(tmp_path, monkeypatch):
    """demo.json wiring: ours vs its supervised teacher (AP), ours vs plain pseudo labels (AP75)."""
    def fake_run(args, env):
        student = Path(args.output_dir) / "student"
        student.mkdir(parents=True)
        (student / "metrics.jsonl").write_text(json.dumps({"step": 1, "pseudo_boxes_per_image": 1.5, "pseudo_mean_v": 0.8,
                                                           "teacher_mean_v": 0.5, "tau_m": [0.5], "mu_m": [1.0]}) + "\n")
        ours = args.certainty_aware
        m = lambda ap, ap75: {"AP": ap, "AP50": 0.5, "AP75": ap75, "AP_rare": 0.1}
        return {"output_dir": args.output_dir, "teacher": m(0.2 if ours else 0.18, 0.1),
                "student": m(0.3 if ours else 0.25, 0.35 if ours else 0.3)}

    monkeypatch.setattr(sc, "run", fake_run)
    monkeypatch.setattr(sc, "supervised_same_steps", lambda args, env: {"AP": 0.22, "AP50": 0.5, "AP75": 0.1, "AP_rare": 0.1})
    monkeypatch.setattr(sc, "plot_ap_vs_iou", lambda *a, **k: None)
    sc.main(sc.parse_args(["--demo", "--seed", "3", "--out", str(tmp_path), "--demo-backbone-steps", "0"]))
    result = json.loads((tmp_path / "demo.json").read_text())
    assert result["tables"]["setting"]["backbone"] == "none"
    assert result["seed"] == 3 and result["script"] == "ssod_certainty.py"
    (vs_teacher, vs_plain) = result["claims"]
    assert (vs_teacher["metric"], vs_teacher["better"]["value"], vs_teacher["worse"]["value"]) == ("AP", 0.3, 0.2)
    assert (vs_plain["metric"], vs_plain["better"]["value"], vs_plain["worse"]["value"]) == ("AP75", 0.35, 0.3)
    assert result["tables"]["pseudo_labels"]["ours"]["pseudo_boxes_per_image"] == 1.5
    assert result["tables"]["methods"]["supervised, side-aware head, 600 steps"]["AP"] == 0.22


def test_teacher_of_the_other_head_is_a_clear_error(tmp_path):
    torch.save({"model": tiny_detector(certainty_aware=False).state_dict()}, tmp_path / "reg.pth")
    with pytest.raises(ValueError, match="does not fit"):
        sc.train_teacher(tiny_args("--teacher", tmp_path / "reg.pth"), argparse.Namespace(device="cpu"), 8, None,
                         tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sc.train_teacher(tiny_args("--teacher", tmp_path / "missing.pth"), None, 8, None, tmp_path)


class Oracle(nn.Module):
    """Predicts, image after image, the non-difficult truth of `dataset` (score 1)."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = iter([dataset.annotations(i) for i in range(len(dataset))])

    def forward(self, images):
        out = []
        for _ in images:
            t = next(self.truth)
            keep = torch.as_tensor(~t["difficult"])
            out.append({"boxes": torch.as_tensor(t["boxes"])[keep], "labels": torch.as_tensor(t["labels"])[keep],
                        "scores": torch.ones(int(keep.sum()))})
        return out


def test_voc2007_is_scored_as_detectron2_with_difficult_objects_ignored(tmp_path):
    from common.data import VOCDetection
    from common.distributed import init_distributed
    from common.evaluation import evaluation_metric
    from common.synthetic import export_voc

    root = export_voc(SyntheticDetection(4, 64, seed=4, difficulty="hard"), tmp_path, "test")  # 2 difficult, in image 0
    val = VOCDetection(root, "test", detection_transforms(False), classes=SyntheticDetection.classes)
    assert sum(int(val.annotations(i)["difficult"].sum()) for i in range(4)) == 2
    rare = sorted({int(c) for c in val.annotations(0)["labels"][val.annotations(0)["difficult"]]})
    m = sc.evaluate(tiny_args(), init_distributed("cpu"), Oracle(val), val, rare, evaluation_metric(str(root)))
    # every non-difficult object found, nothing else: AP 1 at every IoU (COCO-style, the two missed
    # difficult objects would count against recall)
    assert m["AP"] == m["AP50"] == m["AP75"] == m["AP@0.95"] == m["AP_rare"] == 1.0 and m["voc07_mAP50"] == 1.0


# ---------------------------------------------------------------- issue 17
def test_backbone_defaults_to_imagenet_weights(torchvision_hub):
    flags = [f for f in TINY if f not in ("--pretrained", "none")]
    args = sc.parse_args(flags)
    assert args.pretrained == "torchvision"
    model = sc.build_ssod_detector(args, 8)
    assert [w.name for w in torchvision_hub] == ["IMAGENET1K_V1"]
    assert bool((model.backbone.body.conv1.weight == 0.25).all())  # the (stand-in) ImageNet weights arrived


def test_random_init_with_frozen_layers_is_refused(capsys):
    with pytest.raises(SystemExit):
        sc.parse_args(["--pretrained", "none"])  # frozen_bn, --trainable-layers 3: stem and res2 stay random
    assert "--pretrained torchvision" in capsys.readouterr().err
    assert sc.parse_args(["--pretrained", "none", "--norm", "bn", "--trainable-layers", "5"]).pretrained == "none"


def test_train_scale_sampling_choice_and_range(capsys):
    assert sc.train_scales(sc.parse_args(["--train-scales", "640", "800"])) == [640, 800]
    ranged = sc.parse_args(["--train-scales", "640", "800", "--train-scale-sampling", "range"])
    assert sc.train_scales(ranged) == list(range(640, 801))  # Detectron2: randint(640, 801)
    with pytest.raises(SystemExit):
        sc.parse_args(["--train-scales", "640", "720", "800", "--train-scale-sampling", "range"])
    assert "LO HI" in capsys.readouterr().err


def test_global_batch_that_does_not_divide_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--batch-size 8 .* 3 processes"):
        sc.train_stage(tiny_args("--batch-size", 8), argparse.Namespace(world_size=3), None, None, tmp_path, 1)


def write_coco(root, split, images, annotations=None, name=None):
    """A tiny COCO root: 32-px PNGs and annotations/<name or instances_split>.json."""
    import numpy as np
    from PIL import Image

    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    for im in images:
        Image.fromarray(np.full((32, 32, 3), 40 * im["id"], np.uint8)).save(root / split / im["file_name"])
    data = {"images": images, "categories": [{"id": 1, "name": "thing"}]}
    if annotations is not None:
        data["annotations"] = annotations
    (root / "annotations" / (name or f"instances_{split}.json")).write_text(json.dumps(data))


IMAGES = [{"id": k, "file_name": f"{k}.png", "height": 32, "width": 32} for k in (1, 2)]


@pytest.mark.parametrize("name", ["instances_unlabeled2017.json", "image_info_unlabeled2017.json"])
def test_unlabeled_coco_image_info_file_is_accepted(tmp_path, name):
    # the documented COCO-full command: an image list without "annotations" (issue 17)
    write_coco(tmp_path / "coco", "unlabeled2017", IMAGES, name=name)
    args = tiny_args("--unlabeled-data", tmp_path / "coco", "--unlabeled-split", "unlabeled2017",
                     "--output-dir", tmp_path / "out")
    unlabeled = sc.build_unlabeled_set(args)
    assert len(unlabeled) == 2 and unlabeled.image_ids == [1, 2]
    assert json.loads((tmp_path / "out" / "unlabeled" / "instances_unlabeled2017.json").read_text())["annotations"] == []
    image, target = unlabeled[0]
    assert image.shape == (3, 32, 32) and target["boxes"].shape == (0, 4)


class Replay(nn.Module):
    """Returns the given detections, image after image."""

    def __init__(self, detections):
        super().__init__()
        self.detections = iter(detections)

    def forward(self, images):
        return [next(self.detections) for _ in images]


def test_heldout_and_rare_class_scoring_keep_crowd_regions(tmp_path):
    # image 1: an object and a crowd region; image 2: an object. Scored against the annotation
    # file as written, a confident detection on the crowd region is neither TP nor FP (COCOeval).
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 12, 12], "area": 144, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [16, 16, 14, 14], "area": 150, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0}]
    write_coco(tmp_path / "coco", "train", IMAGES, anns)
    args = tiny_args("--data", tmp_path / "coco", "--train-split", "train", "--output-dir", tmp_path / "out")
    from common.data import build_detection_dataset, subset_by_ids

    train = build_detection_dataset(str(tmp_path / "coco"), "train", train=True)  # crowd dropped for training
    unlabeled = subset_by_ids(train, [1, 2])
    heldout = sc.HeldOut(sc.heldout_set(args, unlabeled), 10)
    assert heldout[0][1]["iscrowd"].tolist() == [False, True] and heldout[0][1]["area"].tolist() == [144, 150]
    found = [{"boxes": torch.tensor([[16.0, 16, 30, 30], [2, 2, 14, 14]]), "labels": torch.tensor([1, 1]),
              "scores": torch.tensor([0.9, 0.8])},
             {"boxes": torch.tensor([[4.0, 4, 24, 24]]), "labels": torch.tensor([1]), "scores": torch.tensor([0.8])}]
    m = sc.evaluate(args, init_distributed("cpu"), Replay(found), heldout, [1], "coco")
    assert m["AP"] == pytest.approx(1.0) and m["AP_rare"] == pytest.approx(1.0)


def test_one_to_one_sampling_repeats_the_labelled_images():
    # Table 3.3 right (issue 17 item 8): as many labelled items as unlabelled ones
    labeled, unlabeled = SyntheticDetection(3, 64, seed=1), SyntheticDetection(7, 64, seed=2)
    rep = sc.Repeated(labeled, len(unlabeled))
    assert len(rep) == 7 and rep.classes == labeled.classes
    assert torch.equal(rep[4][0], labeled[1][0]) and rep.image_size(5) == labeled.image_size(2)
    ds = sc.SemiSupervisedSet(rep, unlabeled, detection_transforms(True, (64,), 64), sc.strong_augmentation(tiny_args()))
    assert len(ds) == 14 and sum("weak_image" in ds[i][1] for i in range(len(ds))) == 7
    assert sc.parse_args(["--sampling", "1:1"]).sampling == "1:1" and sc.parse_args([]).sampling == "union"
