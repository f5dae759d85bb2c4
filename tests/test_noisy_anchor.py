"""noisy_anchor.py: the contract functions against hand-computed values, c and r without gradient,
plain focal loss when soft labels and re-weighting are off (RetinaNet and RPN), top-N collisions,
the evaluation helpers, smoke runs (RetinaNet, Faster R-CNN FPN, 2-process torchrun) and resume."""
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
    """The gradient w.r.t. the logits is that of focal_bce with c and r held constant."""
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
    ref = (w * na.focal_bce(x, target).sum(1)).sum() / len(pos)
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
    d = na.parse_args(["--demo", "--iters", "3"])
    assert d.iters == 3 and d.backbone == "resnet18" and d.device == "cpu"
    p = na.parse_args([])
    assert (p.topn, p.alpha, p.gamma, p.lr, p.iters, p.batch_size) == (30, 0.75, 1.0, 0.005, 180_000, 8)
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
    assert "      -      -      -" in capsys.readouterr().out  # APs / APm / APl do not exist on VOC
