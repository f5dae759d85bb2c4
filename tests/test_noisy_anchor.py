"""noisy_anchor.py: the contract functions against hand-computed values, c and r without gradient,
plain focal loss when soft labels and re-weighting are off (RetinaNet and RPN), top-N collisions,
the evaluation helpers, smoke runs (RetinaNet, Faster R-CNN FPN, 2-process torchrun) and resume."""
import argparse
import json
import math

import pytest
import torch
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou, sigmoid_focal_loss

import noisy_anchor as na
from common.data import collate_detection, detection_transforms
from common.synthetic import SyntheticDetection
from common.distributed import init_distributed
from common.engine import load_checkpoint
from conftest import record_autocast, run_torchrun

TINY = ["--data", "synthetic", "--synthetic-train", "8", "--synthetic-val", "4", "--synthetic-size", "64",
        "--backbone", "resnet18", "--norm", "bn", "--trainable-layers", "5", "--min-size", "64", "--max-size", "64",
        "--train-scales", "64", "--anchor-sizes", "16", "32", "64", "128", "256", "--batch-size", "2",
        "--warmup-iters", "1", "--lr", "0.01", "--workers", "0", "--device", "cpu", "--log-every", "1"]


def tiny_args(*extra):
    return na.parse_args([*TINY, *map(str, extra)])


# ---------------------------------------------------------------- contract functions
def test_cleanliness_hand_values():
    loc_a, cls_c = torch.tensor([0.8, 0.5, 0.0]), torch.tensor([0.4, 0.9, 1.0])
    assert torch.allclose(na.cleanliness(loc_a, cls_c), torch.tensor([0.7, 0.6, 0.25]))  # 0.75 loc + 0.25 cls
    assert torch.allclose(na.cleanliness(loc_a, cls_c, alpha=0.5), torch.tensor([0.6, 0.7, 0.5]))
    x = torch.rand(3, 5)
    assert na.cleanliness(x, x).shape == (3, 5)


def test_reweight_hand_values_and_mean_one():
    loc_a, cls_c = torch.tensor([0.5, 0.0]), torch.tensor([0.5, 0.0])
    # f = 1 / (1 - x): raw r = [2, 1] (gamma 1) -> / mean 1.5
    assert torch.allclose(na.reweight(loc_a, cls_c), torch.tensor([4 / 3, 2 / 3]))
    # gamma 2: raw [4, 1] -> / 2.5
    assert torch.allclose(na.reweight(loc_a, cls_c, gamma=2.0), torch.tensor([1.6, 0.4]))
    # alpha mixes f(loc_a) and f(cls_c): 0.75 * 2 + 0.25 * 1 = 1.75 and 0.75 * 1 + 0.25 * 4 = 1.75
    assert torch.allclose(na.reweight(torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.75])), torch.ones(2))
    # gamma 0 switches re-weighting off (Table 2.4a)
    assert torch.allclose(na.reweight(torch.rand(7), torch.rand(7), gamma=0.0), torch.ones(7))
    r = na.reweight(torch.rand(2, 9), torch.rand(2, 9))
    assert r.shape == (2, 9) and torch.isclose(r.mean(), torch.tensor(1.0))


def test_reweight_finite_at_one():
    r = na.reweight(torch.tensor([1.0, 0.5, 1.0]), torch.tensor([1.0, 0.5, 0.0]))
    assert torch.isfinite(r).all() and torch.isclose(r.mean(), torch.tensor(1.0))
    f1 = 1 / na.EPS  # f at the clamp
    raw = torch.tensor([f1, 2.0, 0.75 * f1 + 0.25])
    assert torch.allclose(r, raw / raw.mean())
    assert na.reweight(torch.zeros(0), torch.zeros(0)).numel() == 0


def test_c_and_r_carry_no_gradient():
    loc_a = torch.rand(6, requires_grad=True)
    cls_c = torch.rand(6, requires_grad=True)
    assert not na.cleanliness(loc_a, cls_c).requires_grad
    assert not na.reweight(loc_a, cls_c).requires_grad


def test_topn_assign_hand_values_and_collisions():
    iou = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5],
                        [0.85, 0.2, 0.7, 0.3, 0.6]])
    # GT0 claims anchors {0, 1}, GT1 claims {0, 2} (n=2): anchor 0 is claimed twice, GT0 has the higher IoU
    assert na.topn_assign(iou, 2).tolist() == [0, 0, 1, -1, -1]
    # n=3: GT0 {0, 1, 4}, GT1 {0, 2, 4}; anchor 4 goes to GT1 (0.6 > 0.5)
    assert na.topn_assign(iou, 3).tolist() == [0, 0, 1, -1, 1]
    # n larger than the anchors: everything is claimed, each anchor by its best GT
    assert na.topn_assign(iou, 50).tolist() == [0, 0, 1, 1, 1]
    assert na.topn_assign(torch.zeros(0, 4), 3).tolist() == [-1] * 4
    assert na.topn_assign(iou, 2).dtype == torch.long


def test_topn_assign_sizes():
    iou = torch.rand(4, 200)
    matched = na.topn_assign(iou, 30)
    assert (matched >= 0).sum() <= 4 * 30
    for g in range(4):  # every GT keeps the anchors it claims unless a stronger GT took them
        top = iou[g].topk(30).indices
        lost = matched[top] != g
        assert (iou[matched[top][lost], top[lost]] > iou[g, top[lost]]).all()


def test_focal_bce_is_focal_loss_for_hard_labels():
    logits = torch.randn(50, 6) * 3
    t = (torch.rand(50, 6) > 0.8).float()
    assert torch.allclose(na.focal_bce(logits, t), sigmoid_focal_loss(logits, t), atol=1e-6)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none")
    assert torch.allclose(na.focal_bce(logits, t, alpha=-1, gamma=0.0), plain, atol=1e-6)


# ---------------------------------------------------------------- losses
def _retina_inputs(seed=0, num_anchors=300, num_classes=5):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(num_anchors, 2, generator=g) * 80
    anchors = torch.cat([xy, xy + 8 + torch.rand(num_anchors, 2, generator=g) * 40], 1)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0], [30.0, 20.0, 90.0, 100.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 50.0, 40.0, 90.0]]), "labels": torch.tensor([4])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    cls_logits = torch.randn(3, num_anchors, num_classes, generator=g, requires_grad=True)
    deltas = (0.1 * torch.randn(3, num_anchors, 4, generator=g)).requires_grad_()
    return cls_logits, deltas, [anchors] * 3, targets


def test_loss_is_plain_focal_loss_on_topn_when_switched_off():
    from torchvision.models.detection._utils import BoxCoder

    cls_logits, deltas, anchors, targets = _retina_inputs()
    box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    matched = [na.topn_assign(box_iou(t["boxes"], a), 20) for t, a in zip(targets, anchors)]
    losses = na.noisy_anchor_losses(cls_logits, deltas, anchors, targets, matched, box_coder,
                                    soft_labels=False, reweighting=False, beta=0.0)
    cls_ref, reg_ref = [], []
    for logits, d, a, t, m in zip(cls_logits, deltas, anchors, targets, matched):
        onehot = torch.zeros_like(logits)
        pos = m >= 0
        onehot[pos, t["labels"][m[pos]]] = 1.0
        num_pos = max(1, int(pos.sum()))
        cls_ref.append(sigmoid_focal_loss(logits, onehot, reduction="sum") / num_pos)
        reg_t = box_coder.encode_single(t["boxes"][m[pos]], a[pos])
        reg_ref.append((d[pos] - reg_t).abs().sum() / num_pos)
    assert torch.allclose(losses["classification"], sum(cls_ref) / 3, rtol=1e-5)
    assert torch.allclose(losses["bbox_regression"], sum(reg_ref) / 3, rtol=1e-5)
    for kind in na.SOFT_FOCAL:  # hard labels get the plain focal loss whatever --soft-focal says
        other = na.noisy_anchor_losses(cls_logits, deltas, anchors, targets, matched, box_coder,
                                       soft_labels=False, reweighting=False, beta=0.0, soft_focal=kind)
        assert torch.allclose(other["classification"], losses["classification"], rtol=1e-6), kind


@pytest.mark.parametrize("flags", [["--baseline"], ["--no-soft-labels", "--no-reweight"]])
def test_switched_off_head_equals_torchvision_retinanet_loss(flags):
    """Same assignment (IoU 0.5 / 0.4 with ignored anchors, or top-N), beta 0 (torchvision's L1)."""
    args = tiny_args(*flags, "--smooth-l1-beta", "0")
    torch.manual_seed(0)
    model = na.build_model(args, 8)
    ds = SyntheticDetection(2, 64, seed=1, transforms=detection_transforms(True, (64,), 64))
    images, targets = collate_detection([ds[i] for i in range(2)])
    torch.manual_seed(0)
    ours = model(list(images), list(targets))
    model.head.compute_loss = lambda *a: RetinaNetHead.compute_loss(model.head, *a)  # torchvision's own
    torch.manual_seed(0)
    ref = model(list(images), list(targets))
    for k in ref:
        assert torch.allclose(ours[k], ref[k], rtol=1e-5), k


def test_soft_labels_and_weights_enter_the_loss_without_gradient_paths():
    """The gradient w.r.t. the logits is that of the default soft focal form (QFL) with c and r held
    constant."""
    from torchvision.models.detection._utils import BoxCoder

    cls_logits, deltas, anchors, targets = _retina_inputs(seed=3)
    box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    t, a, logits, d = targets[0], anchors[0], cls_logits[0], deltas[0]
    m = na.topn_assign(box_iou(t["boxes"], a), 15)
    losses = na.noisy_anchor_losses(logits[None], d[None], [a], [t], [m], box_coder)
    g_logits, g_deltas = torch.autograd.grad(sum(losses.values()), (logits, d))
    pos = torch.where(m >= 0)[0]
    lab = t["labels"][m[pos]]
    loc_a = na.paired_iou(box_coder.decode_single(d[pos].detach(), a[pos]), t["boxes"][m[pos]])
    cls_c = logits[pos, lab].detach().sigmoid()
    c, r = na.cleanliness(loc_a, cls_c), na.reweight(loc_a, cls_c)
    assert (c > 0).all() and (c < 1).all() and not torch.allclose(r, torch.ones_like(r))
    x = logits.detach().clone().requires_grad_()
    y = d.detach().clone().requires_grad_()
    target = torch.zeros_like(x)
    target[pos, lab] = c
    w = torch.ones(len(x))
    w[pos] = r
    ref = (w * na.soft_focal_loss(x, target, "qfl").sum(1)).sum() / len(pos)
    reg_t = box_coder.encode_single(t["boxes"][m[pos]], a[pos])
    ref = ref + (r * torch.nn.functional.smooth_l1_loss(y[pos], reg_t, beta=0.11, reduction="none").sum(1)).sum() / len(pos)
    rx, ry = torch.autograd.grad(ref, (x, y))
    assert torch.allclose(g_logits, rx, atol=1e-6) and torch.allclose(g_deltas, ry, atol=1e-6)


def test_rpn_switched_off_equals_torchvision_and_unit_anchor_iou():
    args = tiny_args("--arch", "faster_rcnn_fpn", "--baseline")
    torch.manual_seed(0)
    model = na.build_model(args, 8)
    rpn = model.rpn
    assert isinstance(rpn, na.NoisyAnchorRPN)
    g = torch.Generator().manual_seed(0)
    labels = [(torch.rand(500, generator=g) * 3).floor() - 1 for _ in range(2)]  # -1 / 0 / 1
    objectness = torch.randn(1000, 1, generator=g)
    deltas = 0.2 * torch.randn(1000, 4, generator=g)
    reg_targets = [0.2 * torch.randn(500, 4, generator=g) for _ in range(2)]
    rpn.soft_labels = rpn.reweighting = False
    torch.manual_seed(5)
    ours = rpn.compute_loss(objectness, deltas, labels, reg_targets)
    torch.manual_seed(5)
    ref = RegionProposalNetwork.compute_loss(rpn, objectness, deltas, labels, reg_targets)
    assert all(torch.allclose(a, b, rtol=1e-5) for a, b in zip(ours, ref))
    # the unit-anchor IoU inside NoisyAnchorRPN equals the IoU of the boxes decoded from real anchors
    anchors = torch.tensor([[10.0, 20.0, 74.0, 52.0], [0.0, 0.0, 16.0, 48.0]])
    d, t = 0.3 * torch.randn(2, 4, generator=g), 0.3 * torch.randn(2, 4, generator=g)
    unit = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(2, 4)
    coder = rpn.box_coder
    real = na.paired_iou(coder.decode_single(d, anchors), coder.decode_single(t, anchors))
    assert torch.allclose(real, na.paired_iou(coder.decode_single(d, unit), coder.decode_single(t, unit)), atol=1e-5)


def test_rpn_loss_is_float32_for_bfloat16_outputs():
    torch.manual_seed(0)
    rpn = na.build_model(tiny_args("--arch", "faster_rcnn_fpn"), 8).rpn
    g = torch.Generator().manual_seed(0)
    labels = [(torch.rand(500, generator=g) * 3).floor() - 1 for _ in range(2)]
    objectness, deltas = torch.randn(1000, 1, generator=g), 0.2 * torch.randn(1000, 4, generator=g)
    reg_targets = [0.2 * torch.randn(500, 4, generator=g) for _ in range(2)]
    torch.manual_seed(5)
    ref = rpn.compute_loss(objectness, deltas, labels, reg_targets)
    torch.manual_seed(5)
    low = rpn.compute_loss(objectness.bfloat16(), deltas.bfloat16(), labels, reg_targets)  # --amp on the CPU
    assert all(x.dtype == torch.float32 for x in low)
    assert all(torch.allclose(a, b, rtol=2e-2) for a, b in zip(ref, low))


def test_rpn_soft_loss_runs_and_differs():
    args = tiny_args("--arch", "faster_rcnn_fpn")
    torch.manual_seed(0)
    model = na.build_model(args, 8)
    assert isinstance(model.rpn.proposal_matcher, na.TopNMatcher)
    ds = SyntheticDetection(2, 64, seed=1, transforms=detection_transforms(True, (64,), 64))
    images, targets = collate_detection([ds[i] for i in range(2)])
    losses = model(list(images), list(targets))
    assert set(losses) >= {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


# ---------------------------------------------------------------- evaluation helpers
def test_proposal_recall_hand_values():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])}]
    # proposal 0 covers GT0 exactly; proposal 1 covers GT1 at IoU 0.62 (8.1 x 10 / (100 + 81 - 81) ... )
    props = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 26.2, 30.0], [0.0, 0.0, 10.0, 9.0]])}]
    ar = na.proposal_recall(props, targets, ks=(1, 2, 3))
    assert ar["AR@1"] == pytest.approx(0.5)  # one of two GTs at every threshold
    assert ar["AR@2"] == pytest.approx((1.0 + 0.3) / 2)  # GT1 counts at 0.5, 0.55, 0.6
    assert ar["AR@3"] == pytest.approx((1.0 + 0.3) / 2)  # one-to-one: the third box cannot take GT0 again


def test_confidence_iou_stats_hand_values():
    targets = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1])}]
    preds = [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 10.0]]),
              "scores": torch.tensor([0.9, 0.8, 0.1]), "labels": torch.tensor([1, 1, 2])}]
    s = na.confidence_iou_stats(preds, targets, top_fraction=0.5)  # ceil(1.5) = 2 predictions
    assert s["count"] == 2
    assert s["mean_conf"] == pytest.approx(0.85) and s["mean_iou"] == pytest.approx(0.75)
    assert s["pearson_r"] == pytest.approx(1.0)
    s = na.confidence_iou_stats(preds, targets, top_fraction=1.0)  # the class-2 box matches nothing: IoU 0
    assert s["mean_iou"] == pytest.approx(0.5)


# ---------------------------------------------------------------- runs
def test_smoke_retinanet_and_pr_plot(tmp_path):
    out = tmp_path / "ours"
    results = na.main(tiny_args("--iters", "2", "--output-dir", out))
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["metrics"]) >= {"AP", "AP50", "AP75"}
    assert set(saved["table2_7"]) == {"before_nms", "after_nms"}
    assert (out / "fig2_2_pr_curves.png").is_file() and (out / "checkpoint.pth").is_file()
    assert results["flags"]["assign"] == "topn"
    na.main(na.parse_args(["--plot-pr", str(out), str(out), "--output-dir", str(tmp_path / "fig")]))
    assert (tmp_path / "fig" / "fig2_2_pr_curves.png").is_file()
    with pytest.raises(FileNotFoundError, match="results.json"):
        na.main(na.parse_args(["--plot-pr", str(tmp_path / "missing")]))


def test_smoke_faster_rcnn_rpn_recall(tmp_path):
    results = na.main(tiny_args("--arch", "faster_rcnn_fpn", "--iters", "2", "--output-dir", tmp_path))
    ar = results["proposal_recall"]
    assert set(ar) == {"AR@100", "AR@300", "AR@1000"}
    assert 0.0 <= ar["AR@100"] <= ar["AR@300"] <= ar["AR@1000"] <= 1.0


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
    full = tmp_path / "full"
    na.main(tiny_args("--iters", "4", "--output-dir", full, "--resume", "auto"))  # nothing to resume: fresh
    part = tmp_path / "part"
    real = na.train_detector
    monkeypatch.setattr(na, "train_detector", lambda *a, **k: real(*a, **{**k, "max_steps": 2}))
    na.main(tiny_args("--iters", "4", "--output-dir", part))  # "interrupted" after 2 steps
    assert load_checkpoint(part / "checkpoint.pth")["step"] == 2
    monkeypatch.setattr(na, "train_detector", real)
    na.main(tiny_args("--iters", "4", "--output-dir", part, "--resume", "auto"))
    a, b = load_checkpoint(full / "checkpoint.pth"), load_checkpoint(part / "checkpoint.pth")
    assert b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        na.main(tiny_args("--iters", "4", "--output-dir", part, "--resume", tmp_path / "nope.pth"))


def test_amp_train_step_on_the_cpu(tmp_path, monkeypatch):
    # --amp on the CPU is bfloat16 autocast: the NoisyAnchor loss takes the head's bfloat16 outputs
    # and computes in float32 (indexing float32 c / r into them crashed before)
    args = tiny_args("--iters", "1", "--amp", "--output-dir", tmp_path)
    train_set, _ = na.build_datasets(args)
    dtypes = record_autocast(monkeypatch, na)
    na.train(args, init_distributed("cpu"), na.build_model(args, len(train_set.classes)), train_set, tmp_path)
    assert dtypes == [torch.bfloat16]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 1
    log = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert log["step"] == 1 and math.isfinite(log["loss"])


def test_torchrun_two_processes(tmp_path):
    run_torchrun(["noisy_anchor.py", *TINY, "--iters", "2", "--output-dir", tmp_path])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["flags"]["iters"] == 2 and "AP" in saved["metrics"]


def test_baseline_flag_and_demo_defaults():
    args = na.parse_args(["--baseline"])
    assert (args.assign, args.soft_labels, args.reweight) == ("iou", False, False)
    d = na.parse_args(["--demo", "--out", "x"])
    assert d.output_dir == "x" and d.device == "cpu" and d.workers == 0
    p = na.parse_args([])
    assert (p.topn, p.alpha, p.gamma, p.lr, p.schedule, p.batch_size, p.soft_focal) == (30, 0.75, 1.0, 0.005, "1x", 8, "qfl")
    assert na.schedule(p) == {"lr": 0.005, "iters": 180_000, "warmup": 500, "milestones": (120_000, 160_000)}
    assert na.parse_args(["--arch", "faster_rcnn_fpn"]).lr == 0.01
    with pytest.raises(SystemExit):
        na.parse_args(["--topn", "0"])


def test_voc_root_reports_detectron2_voc_metrics(tmp_path, capsys):
    from common.data import VOCDetection
    from common.distributed import init_distributed
    from common.synthetic import export_voc

    root = export_voc(SyntheticDetection(2, 64, seed=0), tmp_path, "test")
    args = tiny_args("--data", root, "--val-split", "test")
    val = VOCDetection(root, "test", detection_transforms(False), classes=SyntheticDetection.classes)
    torch.manual_seed(0)
    results = na.evaluate(args, init_distributed("cpu"), na.build_model(args, 8), val)
    m = results["metrics"]
    assert {"AP", "AP50", "AP75", "voc_mAP50", "voc07_mAP50"} <= set(m) and "APs" not in m  # VOC2007: 07 metric
    assert m["AP50"] == m["voc07_mAP50"]
    na.print_tables({"untrained": results})
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("untrained"))
    assert row.split()[-3:] == ["n/a"] * 3  # APs / APm / APl do not exist on VOC


# ---------------------------------------------------------------- issue 16
def test_retinanet_loss_is_float32_for_bfloat16_outputs():
    """--amp: the head's bfloat16 logits with float32 c / r crashed (index put of float into bfloat16),
    in NoisyAnchor and in --baseline alike."""
    from torchvision.models.detection._utils import BoxCoder

    cls_logits, deltas, anchors, targets = _retina_inputs(seed=2)
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    matched = [na.topn_assign(box_iou(t["boxes"], a), 15) for t, a in zip(targets, anchors)]
    for kw in ({}, {"soft_labels": False, "reweighting": False}):
        ref = na.noisy_anchor_losses(cls_logits, deltas, anchors, targets, matched, coder, **kw)
        low = na.noisy_anchor_losses(cls_logits.bfloat16(), deltas.bfloat16(), anchors, targets, matched, coder, **kw)
        assert all(v.dtype == torch.float32 for v in low.values())
        assert all(torch.allclose(ref[k], low[k], rtol=3e-2) for k in ref)


@pytest.mark.parametrize("flags", [[], ["--baseline"]])
def test_amp_step_baseline_and_noisy_anchor(tmp_path, flags):
    args = tiny_args(*flags, "--iters", "1", "--amp", "--output-dir", tmp_path)
    train_set, _ = na.build_datasets(args)
    dtypes = record_autocast(monkeypatch := pytest.MonkeyPatch(), na)
    try:
        na.train(args, init_distributed("cpu"), na.build_model(args, len(train_set.classes)), train_set, tmp_path)
    finally:
        monkeypatch.undo()
    assert dtypes == [torch.bfloat16] and load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 1


def test_crowd_boxes_get_no_anchors(tmp_path):
    """A COCO iscrowd=1 box is not a training target, so no anchor is assigned to it (it took 28)."""
    from common.synthetic import export_coco

    ann = export_coco(SyntheticDetection(2, 64, seed=0), tmp_path, "train2017")
    data = json.loads(ann.read_text())
    image_id = data["images"][0]["id"]
    n_before = sum(a["image_id"] == image_id for a in data["annotations"])
    data["annotations"].append({"id": 999, "image_id": image_id, "category_id": 1, "bbox": [4.0, 4.0, 40.0, 40.0],
                                "area": 1600.0, "iscrowd": 1, "segmentation": {"counts": [0, 4096], "size": [64, 64]}})
    ann.write_text(json.dumps(data))
    args = tiny_args("--data", tmp_path, "--train-split", "train2017", "--val-split", "train2017")
    train_set, val_set = na.build_datasets(args)
    k = train_set.image_ids.index(image_id)
    _, target = train_set[k]
    assert len(target["boxes"]) == n_before  # the crowd box is not in the training target
    crowd = torch.tensor([[4.0, 4.0, 44.0, 44.0]])
    assert not any(torch.equal(b, crowd[0]) for b in target["boxes"])
    _, val_target = val_set[val_set.image_ids.index(image_id)]
    assert int(val_target["iscrowd"].sum()) == 1  # evaluation keeps it, flagged


def _soft_minimum(kind, t):
    logits = torch.linspace(-12, 12, 24001)
    loss = na.soft_focal_loss(logits, torch.full_like(logits, t), kind)
    return torch.sigmoid(logits[loss.argmin()]).item()


def test_soft_focal_forms_and_their_minima():
    """Eq. 2.1 with t = c (literal) has its minimum far below c; torchvision's blended form pushes it
    away from 0.5; GFL's QFL puts it at c (the issue's numbers)."""
    expected = {"literal": (0.33, 0.40, 0.48, 0.60), "blended": (0.12, 0.50, 0.88, 0.99), "qfl": (0.3, 0.5, 0.7, 0.9)}
    for kind, p_star in expected.items():
        got = [_soft_minimum(kind, t) for t in (0.3, 0.5, 0.7, 0.9)]
        assert got == pytest.approx(p_star, abs=0.01), kind
    logits, hard = torch.randn(40, 5) * 3, (torch.rand(40, 5) > 0.7).float()
    assert torch.allclose(na.soft_focal_loss(logits, hard, "blended"), na.soft_focal_loss(logits, hard, "literal"), atol=1e-6)
    assert na.parse_args(["--soft-focal", "qfl"]).soft_focal == "qfl"
    model = na.build_model(tiny_args("--soft-focal", "blended"), 8)
    assert model.head.loss_kwargs["soft_focal"] == "blended"
    with pytest.raises(SystemExit):
        na.parse_args(["--soft-focal", "nope"])


def test_global_batch_must_divide_over_the_processes(tmp_path):
    args = tiny_args("--batch-size", "8", "--iters", "1")
    env = argparse.Namespace(world_size=3, rank=0, device=torch.device("cpu"), distributed=True)
    for batch in (8, 2):  # 8 on 3 trained at 6 with the LR of 8; 2 on 3 crashed
        args.batch_size = batch
        with pytest.raises(SystemExit, match="global batch and must divide over the 3 processes"):
            na.train(args, env, None, None, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written


def test_schedule_follows_the_global_batch():
    """Detectron2's reference-world-size rule: LR x B/8, iterations, drops and warm-up x 8/B."""
    assert na.schedule(na.parse_args(["--batch-size", "16"])) == {
        "lr": 0.01, "iters": 90_000, "warmup": 250, "milestones": (60_000, 80_000)}
    assert na.schedule(na.parse_args(["--schedule", "1.5x"])) == {
        "lr": 0.005, "iters": 270_000, "warmup": 500, "milestones": (180_000, 240_000)}
    assert na.schedule(na.parse_args(["--batch-size", "4", "--iters", "10", "--warmup-iters", "500"]))["iters"] == 10


def test_rpn_only_trains_the_rpn_alone(tmp_path):
    """Table 2.5: the paper trains the RPN on its own first; --rpn-only freezes the box head and keeps
    its losses out of the objective."""
    args = tiny_args("--arch", "faster_rcnn_fpn", "--rpn-only", "--iters", "2", "--output-dir", tmp_path)
    train_set, _ = na.build_datasets(args)
    torch.manual_seed(0)
    model = na.build_model(args, len(train_set.classes))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    na.train(args, init_distributed("cpu"), model, train_set, tmp_path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("roi_heads."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("rpn."))
    log = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "loss_objectness" in log and "loss_classifier" not in log
    with pytest.raises(SystemExit):
        na.parse_args(["--rpn-only"])  # RetinaNet has no RPN


def test_one_prediction_pass_gives_the_models_own_detections(monkeypatch):
    """The validation set is predicted once (it was two or three times), gathered on rank 0 only;
    NMS after the pass gives exactly the detector's output; the model is not modified."""
    from common.data import collate_detection

    calls = []
    real = na.predict
    monkeypatch.setattr(na, "predict", lambda *a, **k: calls.append(k.get("dst")) or real(*a, **k))
    val = SyntheticDetection(4, 64, seed=5, transforms=detection_transforms(False))
    for arch in ("retinanet", "faster_rcnn_fpn"):
        args = tiny_args("--arch", arch)
        torch.manual_seed(0)
        model = na.build_model(args, 8).eval()
        if arch == "retinanet":  # an untrained head scores nothing above 0.05: lower the threshold
            model.score_thresh = 0.0
        else:
            model.roi_heads.score_thresh = 0.0
        calls.clear()
        results = na.evaluate(args, init_distributed("cpu"), model, val)
        assert calls == [0]
        images, _ = collate_detection([val[i] for i in range(4)])
        with torch.no_grad():
            own = model(list(images))
            candidates = na.OnePass(model)(list(images))
        post = model if arch == "retinanet" else model.roi_heads
        assert (post.nms_thresh, post.detections_per_img) == ((0.5, 300) if arch == "retinanet" else (0.5, 100))
        mine = na.after_nms(candidates, post.nms_thresh, post.detections_per_img)
        assert sum(len(c["boxes"]) for c in candidates) > sum(len(o["boxes"]) for o in own) > 0
        for a, b in zip(own, mine):
            for k in ("boxes", "scores", "labels"):
                assert torch.equal(a[k], b[k]), (arch, k)
        assert ("proposal_recall" in results) == (arch == "faster_rcnn_fpn")


def test_missing_size_ranges_print_na(capsys):
    """COCO's -1 (no ground truth in that size range) reads n/a, never -100.0."""
    from common.evaluation import format_ap

    assert (format_ap(-1.0), format_ap(None), format_ap(0.1234), format_ap(0.1234, 2)) == ("n/a", "n/a", "12.3", "12.34")
    stats = {"mean_conf": 0.5, "mean_iou": 0.5, "pearson_r": 0.1, "count": 3}
    na.print_tables({"x": {"metrics": {"AP": 0.2, "AP50": 0.4, "AP75": 0.1, "APs": 0.1, "APm": 0.3, "APl": -1.0},
                           "table2_7": {"before_nms": stats, "after_nms": stats}}})
    out = capsys.readouterr().out
    assert "-100" not in out and out.split("\n")[2].split()[-1] == "n/a"


def test_heads_keep_their_settings_and_weights():
    """NoisyAnchorHead is built through RetinaNetHead.__init__ with the model's weights;
    NoisyAnchorRPN keeps the RPN's own IoU thresholds (it passed 0.7 / 0.3 whatever they were)."""
    from torchvision.models.detection._utils import Matcher

    torch.manual_seed(0)
    plain = na.build_detector("retinanet", 8, backbone="resnet18", norm="bn", min_size=64, max_size=64)
    head = na.NoisyAnchorHead.replacing(plain.head, soft_focal="qfl")
    assert isinstance(head, RetinaNetHead) and head.loss_kwargs == {"soft_focal": "qfl"}
    assert head.state_dict().keys() == plain.head.state_dict().keys()
    assert all(torch.equal(head.state_dict()[k], v) for k, v in plain.head.state_dict().items())
    frcnn = na.build_detector("faster_rcnn_fpn", 8, backbone="resnet18", norm="bn", min_size=64, max_size=64,
                              rpn_fg_iou_thresh=0.6, rpn_bg_iou_thresh=0.2)
    rpn = na.NoisyAnchorRPN(frcnn.rpn)
    assert isinstance(rpn.proposal_matcher, Matcher)
    assert (rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold) == (0.6, 0.2)


def test_demo_tiny_writes_demo_json(tmp_path, monkeypatch):
    """The demo end to end at a toy size (two of its arms): the shared warm-up, demo.json with both
    claims; a second run into the same folder refuses unless --resume auto, which reuses the stages."""
    from common.demo import DEMO_RECIPE, check_demo_result

    monkeypatch.setitem(DEMO_RECIPE["detector"], "batch_size", 2)  # a fast toy run
    monkeypatch.setattr(na, "DEMO_ARMS", {k: na.DEMO_ARMS[k] for k in ("baseline", "noisy_anchor")})
    out = tmp_path / "demo"
    argv = ["--demo", "--seed", "3", "--out", str(out), "--demo-steps", "8", "8", "--demo-images", "16", "8",
            "--demo-cache", str(tmp_path / "cache"), "--demo-backbone-steps", "2"]
    import common.demo as cd

    peaks, optimizer = [], cd.demo_optimizer  # the peak LR each detector training starts from
    monkeypatch.setattr(cd, "demo_optimizer", lambda params, kind="detector", lr=None:
                        (kind == "detector" and peaks.append(lr)) or optimizer(params, kind, lr))
    na.main(na.parse_args(argv))
    assert peaks == [None, 3e-4, 3e-4]  # the warm-up at the recipe's LR, each arm at --demo-arm-lr
    result = json.loads((out / "demo.json").read_text())
    check_demo_result(result)
    assert result["tables"]["setting"]["arm_lr"] == 3e-4
    assert [c["metric"] for c in result["claims"]] == ["AP", "AP75"]
    assert result["claims"][0]["better"]["name"] == "NoisyAnchor" and result["seed"] == 3
    assert set(result["tables"]["table2_7"]) == {"warmup", *na.DEMO_ARMS}
    assert result["tables"]["setting"]["topn"] >= 1
    assert result["tables"]["setting"]["backbone"]["init"] == "demo classifier, 2 steps"
    with pytest.raises(SystemExit, match="not empty"):
        na.main(na.parse_args(argv))
    na.main(na.parse_args([*argv, "--resume", "auto"]))  # every stage reused
    assert json.loads((out / "demo.json").read_text())["claims"] == result["claims"]


def test_multi_scale_and_flip_testing_is_the_union_of_the_views():
    """Table 2.1's multi-scale testing: the candidates of every short side and of each flip (mapped
    back), then one NMS; no extra scale and no flip is the plain pass."""
    val = SyntheticDetection(1, 64, seed=5, transforms=detection_transforms(False))
    images = [val[0][0]]

    def mirror(boxes):
        return torch.stack([64 - boxes[:, 2], boxes[:, 1], 64 - boxes[:, 0], boxes[:, 3]], 1)

    for arch in ("retinanet", "faster_rcnn_fpn"):
        torch.manual_seed(0)
        model = na.build_model(tiny_args("--arch", arch), 8).eval()
        post = model if arch == "retinanet" else model.roi_heads
        post.score_thresh = 0.0
        with torch.no_grad():
            plain, = na.OnePass(model)(images)
            same, = na.OnePass(model, [])(images)
            union, = na.OnePass(model, [96], flip=True)(images)
            flipped, = na.OnePass(model)([images[0].flip(-1)])
            two, = na.OnePass(model, [96])(images)  # the views at 64 and 96 px
            two_flipped, = na.OnePass(model, [96])([images[0].flip(-1)])
        assert all(torch.equal(plain[k], same[k]) for k in plain)
        n, m = len(plain["boxes"]), len(flipped["boxes"])
        expected = torch.cat([plain["boxes"], mirror(flipped["boxes"]), two["boxes"][n:], mirror(two_flipped["boxes"][m:])])
        assert torch.allclose(union["boxes"], expected, atol=1e-4)
        assert torch.equal(union["scores"], torch.cat([plain["scores"], flipped["scores"], two["scores"][n:],
                                                       two_flipped["scores"][m:]]))
        assert ("proposals" in union) == (arch == "faster_rcnn_fpn")
    assert model.transform.min_size == (64,) and post.nms_thresh == 0.5  # the model is untouched
    args = na.parse_args(["--test-scales", "400", "500", "--test-flip"])
    assert args.test_scales == [400, 500] and args.test_flip
