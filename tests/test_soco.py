"""soco.py: views keep the same objects, level assignment, Eq. 5-6, the momentum schedule, LARS
groups, transfer into the detector, the proposal table, and smoke runs of every stage (pre-training
with exact resume, fine-tuning, the demo, 2-process torchrun)."""
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import soco
from common.detectors import build_detector, load_weights
from common.distributed import init_distributed
from common.engine import load_checkpoint
from common.synthetic import SyntheticDetection

from conftest import record_autocast, run_torchrun

TINY = ["--backbone", "resnet18", "--synthetic-images", "8", "--image-size", "64", "--view-size", "64",
        "--v3-size", "32", "--batch-size", "4", "--proj-hidden", "64", "--workers", "0", "--device", "cpu",
        "--log-every", "1"]


def parse(*argv):
    return soco.get_args_parser().parse_args([str(a) for a in argv])


# --- Sec. 3.3 scale-aware assignment, Eq. 5-6, momentum -------------------------------------------
def test_assign_fpn_levels_at_the_boundaries():
    sides = torch.tensor([1.0, 48.0, 48.5, 96.0, 96.5, 192.0, 192.5, 224.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], 1)
    assert soco.assign_fpn_levels(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    rect = torch.tensor([[10.0, 10.0, 10 + 96.0, 10 + 24.0]])  # sqrt(96 x 24) = 48 -> P2
    assert soco.assign_fpn_levels(rect).tolist() == [0]
    # thresholds scale with V1's side: 112-px views halve them
    assert soco.assign_fpn_levels(boxes / 2, view_size=112).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_a_box_in_v3_is_pooled_one_level_below_the_same_box_in_v2():
    enc = soco.ObjectEncoder("fpn", "resnet18", head=False)
    b2 = torch.tensor([[0.0, 0.0, 150.0, 150.0], [0.0, 0.0, 80.0, 80.0]])  # in a 224-px V2
    assert enc.levels(b2).tolist() == [2, 1] and enc.levels(b2 / 2).tolist() == [1, 0]  # V3 = V2 / 2
    small = soco.ObjectEncoder("fpn", "resnet18", head=False, view_size=112)  # a 112-px V1 (demo)
    assert small.levels(b2 / 2).tolist() == [2, 1] and small.levels(b2 / 4).tolist() == [1, 0]


def test_soco_loss_against_a_hand_computation():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v2 = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    v3 = torch.tensor([[-3.0, 0.0], [1.0, 0.0]])
    # proposal 1: -2 cos45 - 2 (-1); proposal 2: -2 (1) - 2 (0)
    expected = ((-2 / math.sqrt(2) + 2) + (-2 + 0)) / 2
    assert soco.soco_loss(v, v2, v3).item() == pytest.approx(expected)
    assert soco.soco_loss(v, v, v).item() == pytest.approx(-4.0)  # the minimum
    # the symmetrised term: cos is symmetric, so soco_loss(z1, q2, q3) = mean -2cos(q2, z1) - 2cos(q3, z1)
    assert soco.soco_loss(v2, v, v3).item() == pytest.approx(
        (-2 * torch.cosine_similarity(v, v2) - 2 * torch.cosine_similarity(v3, v2)).mean().item())


def test_target_momentum_schedule():
    assert soco.target_momentum(0, 100) == pytest.approx(0.99)
    assert soco.target_momentum(100, 100) == pytest.approx(1.0)
    assert soco.target_momentum(50, 100) == pytest.approx(0.995)
    taus = [soco.target_momentum(k, 100, base=0.98) for k in range(101)]
    assert taus[0] == pytest.approx(0.98) and all(a <= b for a, b in zip(taus, taus[1:]))


def test_target_is_an_ema_of_the_online_parameters_only():
    model = soco.SoCo("fpn", "resnet18", proj_hidden=32)
    assert all(not p.requires_grad for p in model.target.parameters())
    assert "predictor" not in dict(model.target.named_children())
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target.parameters()]
    model.update_target(0.99)
    for b, t, o in zip(before, model.target.parameters(), model.online.parameters()):
        assert torch.allclose(t, 0.99 * b + 0.01 * o)


# --- Sec. 3.2 proposals ---------------------------------------------------------------------------
def test_filter_proposals_keeps_the_papers_range():
    W, H = 100, 100  # sqrt(WH) = 100
    boxes = np.array([
        [0, 0, 30, 30],     # size 0.30, ratio 1 -> kept (boundary)
        [0, 0, 29, 29],     # size 0.29 -> dropped
        [0, 0, 80, 80],     # size 0.80 -> kept (boundary)
        [0, 0, 81, 81],     # size 0.81 -> dropped
        [0, 0, 90, 30],     # ratio 3, size 0.52 -> kept (boundary)
        [0, 0, 91, 30],     # ratio > 3 -> dropped
        [0, 0, 20, 60],     # ratio 1/3, size 0.35 -> kept
        [0, 0, 0, 50],      # empty -> dropped
    ], np.float32)
    kept = soco.filter_proposals(boxes, W, H)
    assert kept.tolist() == boxes[[0, 2, 4, 6]].tolist()
    assert torch.equal(soco.filter_proposals(torch.from_numpy(boxes), W, H), torch.from_numpy(boxes[[0, 2, 4, 6]]))
    assert soco.filter_proposals(boxes, W, H, min_side=32).tolist() == [[0, 0, 80, 80]]  # released: w, h >= 32


def test_fallback_never_leaves_an_image_without_a_box():
    tiny = np.array([[0, 0, 5, 5]], np.float32)
    assert soco.final_proposals(tiny, 100, 80).tolist() == [[0, 0, 100, 80]]
    relaxed = np.array([[0, 0, 15, 15]], np.float32)  # size 0.15: out of [0.3, 0.8], inside [0.1, 1]
    assert soco.final_proposals(relaxed, 100, 100).tolist() == relaxed.tolist()


def write_proposals(root, boxes_per_image, sizes):
    """A proposal table from per-image (n_i, 4) uint16 arrays."""
    table = soco.proposal_table(root)
    table.write([len(b) for b in boxes_per_image], {"source": "x"}, boxes=np.concatenate(boxes_per_image),
                sizes=np.asarray(sizes, np.int32))
    return table


def test_proposal_table_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    boxes = [rng.integers(0, 60000, (n, 4)).astype(np.uint16) for n in (3, 1, 7, 2)]
    write_proposals(tmp_path, boxes, [(480, 640)] * 4)
    table = soco.proposal_table(tmp_path)
    assert len(table) == 4 and table.meta["num_boxes"] == 13 and table.arrays["sizes"][2].tolist() == [480, 640]
    assert isinstance(table.arrays["boxes"], np.memmap) and table.arrays["boxes"].dtype == np.uint16
    for i, b in enumerate(boxes):
        assert table[i]["boxes"].tolist() == b.tolist()
    with pytest.raises(FileNotFoundError, match="soco.py proposals"):
        len(soco.proposal_table(tmp_path / "missing"))


def test_proposal_stage_is_resumable(tmp_path):
    args = parse("proposals", "--synthetic-images", 5, "--image-size", 64, "--ss-workers", 1, "--shard-size", 2,
                 "--proposals", tmp_path)
    shards = tmp_path / "shards"
    shards.mkdir(parents=True)
    # an interrupted run left shard 1 (images 2-3) behind: it is reused, not recomputed
    fake = np.array([[1, 2, 30, 40], [3, 4, 50, 60], [0, 0, 64, 64]], np.uint16)
    np.savez(shards / "000001.npz", boxes=fake, counts=np.array([2, 1]), sizes=np.array([[64, 64], [64, 64]], np.int32))
    table = soco.stage_proposals(args)
    assert len(table) == 5 and not shards.exists()
    assert table[2]["boxes"].tolist() == fake[:2].tolist() and table[3]["boxes"].tolist() == fake[2:].tolist()
    for i in (0, 1, 4):
        b = table[i]["boxes"]
        assert len(b) >= 1 and (b[:, 2] <= 64).all() and (b[:, 3] <= 64).all()
    assert soco.stage_proposals(args).meta == table.meta  # complete: read back, not redone
    with pytest.raises(ValueError, match="another image set"):
        soco.stage_proposals(parse("proposals", "--synthetic-images", 6, "--image-size", 64, "--proposals", tmp_path))


# --- Sec. 3.2 views -------------------------------------------------------------------------------
def _coordinate_image(size=200):
    """R = x, G = y (in 1/255 of the side): a view's pixel tells where in the original it came from."""
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    img = torch.zeros(3, size, size, dtype=torch.uint8)
    img[0] = ramp[None, :]
    img[1] = ramp[:, None]
    return img


class _OneImage:
    def __init__(self, img):
        self.img = img

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.img, {}


@pytest.mark.parametrize("extra", [[], ["--v3-crop", "independent", "--star"]])
def test_views_show_the_same_object_in_every_view(tmp_path, extra):
    S = 200
    props = [np.array([[20, 30, 120, 110], [90, 20, 190, 150], [40, 100, 160, 190], [60, 60, 140, 140]], np.uint16)]
    table = write_proposals(tmp_path, props, [(S, S)])
    args = parse("--view-size", 224, "--v3-size", 112, "--no-jitter", *extra)
    ds = soco.SoCoViews(_OneImage(_coordinate_image(S)), table, args)
    v1_scale = 224 / S
    for seed in range(8):
        torch.manual_seed(seed)
        views = ds.geometry(0)
        assert len(views) == (4 if "--star" in extra else 3)
        b1 = views[0][1]
        assert b1.shape == (4, 4)
        originals = {tuple((p * v1_scale).round().tolist()) for p in props[0].astype(np.float32)}
        assert all(tuple(b.round().tolist()) in originals for b in b1)  # V1: the proposals themselves
        for img, boxes, _ in views[1:]:
            size = img.shape[-1]
            for k in range(4):
                x1, y1, x2, y2 = boxes[k].tolist()
                assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
                # the view's pixels at the box corners come from inside V1's box k
                for x, y in ((x1 + 1, y1 + 1), (x2 - 1, y2 - 1)):
                    xi, yi = min(int(x), size - 1), min(int(y), size - 1)
                    ox = img[0, yi, xi].item() / 255 * 224  # position in V1 pixels
                    oy = img[1, yi, xi].item() / 255 * 224
                    tol = 3 + 2 * 224 / size
                    assert b1[k, 0] - tol <= ox <= b1[k, 2] + tol and b1[k, 1] - tol <= oy <= b1[k, 3] + tol


def test_v3_is_v2_downsampled_and_flip_moves_boxes_with_pixels(tmp_path):
    table = write_proposals(tmp_path, [np.array([[10, 10, 90, 70]], np.uint16)], [(100, 100)])
    args = parse("--view-size", 64, "--v3-size", 32, "--no-jitter")
    ds = soco.SoCoViews(_OneImage(_coordinate_image(100)), table, args)
    torch.manual_seed(0)
    (v1, b1, _), (v2, b2, _), (v3, b3, _) = ds.geometry(0)
    assert torch.allclose(b3, b2 / 2) and v3.shape[-1] == 32
    img = torch.zeros(3, 10, 10, dtype=torch.uint8)
    img[:, :, :3] = 255  # the left 3 columns
    torch.manual_seed(1)
    for _ in range(20):  # either unchanged or mirrored, always on the white pixels
        out, b = ds._flip(img, torch.tensor([[0.0, 0.0, 3.0, 10.0]]), 10)
        x1, x2 = int(b[0, 0]), int(b[0, 2])
        assert (out[0, :, x1:x2] == 255).all() and (out[0].sum() == 255 * 30)


def test_v2_is_cropped_from_the_image_not_upsampled_from_v1(tmp_path, monkeypatch):
    """The release crops V2 from the raw image: a 224-px crop of a 448-px image keeps its pixels
    (cropped from the 224-px V1 it would be a 2x up-sampled 112-px patch)."""
    S = 448
    table = write_proposals(tmp_path, [np.array([[10, 10, 300, 300]], np.uint16)], [(S, S)])
    rng = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=rng)
    ds = soco.SoCoViews(_OneImage(img), table, parse("--view-size", 224, "--v3-size", 112, "--no-jitter"))
    monkeypatch.setattr(ds, "_crop", lambda image: (0, 0, 224, 224))  # (top, left, h, w) in image pixels
    (_, b1, _), (v2, b2, _), _ = ds.geometry(0)
    assert torch.equal(v2, img[:, :224, :224])
    assert torch.allclose(b1, torch.tensor([[5.0, 5.0, 150.0, 150.0]])) and torch.allclose(b2, torch.tensor([[10.0, 10.0, 224.0, 224.0]]))


def test_c4_crops_at_the_releases_scale_and_blur_follows_the_view_size():
    assert soco.crop_scale(parse("--arch", "c4")) == (0.6, 1.0) and soco.crop_scale(parse()) == (0.5, 1.0)
    assert soco.crop_scale(parse("--arch", "c4", "--crop-scale", 0.3, 1)) == (0.3, 1.0)
    assert soco.blur_params(224) == (23, (0.1, 2.0))  # BYOL's, the release's sigma
    kernel, sigma = soco.blur_params(112)
    assert kernel == 11 and sigma == pytest.approx((0.05, 1.0))

    def blurs(aug):  # the GaussianBlur whose parameters common.augment.ColorAugment draws
        return [t for t in aug.transforms if isinstance(t, soco.ColorAugment)][0].blur
    ds = soco.SoCoViews(_OneImage(_coordinate_image(64)), None, parse("--view-size", 112, "--v3-size", 56,
                                                                      "--proposals-kind", "whole"))
    for aug in (ds.aug_v1, ds.aug_v2, ds.aug_v3):  # V3 (56 px) keeps V1's blur, as the release's 112-px V3
        assert list(blurs(aug).sigma) == pytest.approx([0.05, 1.0]) and blurs(aug).kernel_size == (11, 11)


def test_cutout_in_boxes_zeroes_a_square_inside_each_box():
    torch.manual_seed(0)
    img = torch.ones(3, 100, 100)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 90.0, 80.0]])
    out = soco.cutout_in_boxes(img, boxes, prob=1.0, ratio=(0.1, 0.3))
    assert torch.equal(img, torch.ones(3, 100, 100))  # the input stays
    zero = (out == 0).all(0)
    assert zero.any()
    ys, xs = torch.nonzero(zero, as_tuple=True)
    area = [int(zero[:55, :55].sum()), int(zero[55:, 55:].sum())]
    assert 0.05 * 1600 <= area[0] <= 0.4 * 1600 and 0.05 * 600 <= area[1] <= 0.4 * 600
    assert torch.equal(soco.cutout_in_boxes(img, boxes, prob=0.0), img)
    # the views dataset applies it to V2 / V3 (never V1) when --cutout-prob is set
    args = parse("--view-size", 64, "--v3-size", 32, "--proposals-kind", "whole", "--cutout-prob", 1.0)
    ds = soco.SoCoViews(_OneImage(torch.full((3, 64, 64), 200, dtype=torch.uint8)), None, args)
    torch.manual_seed(1)
    views, _ = ds[0]
    assert not (views[0] == 0).all(0).any() and (views[1] == 0).all(0).any() and (views[2] == 0).all(0).any()


def test_finetune_pools_rois_as_pretraining_does():
    """Fine-tuning's RoIAlign is pre-training's (aligned=True, same sampling), so the transferred head
    sees the features it was trained on; torchvision's default pooler is aligned=False."""
    from collections import OrderedDict
    from torchvision.ops import roi_align

    args = parse("finetune", "--backbone", "resnet18", "--det-arch", "faster_rcnn_fpn")
    det = soco.build_finetune_detector(args, 3)
    feats = OrderedDict((str(k), torch.randn(1, 8, 64 // 2 ** k, 64 // 2 ** k)) for k in range(4))
    feats["pool"] = torch.randn(1, 8, 4, 4)
    box = torch.tensor([[3.3, 5.1, 20.7, 17.9]])  # small: pooled from P2 (stride 4)
    got = det.roi_heads.box_roi_pool(feats, [box], [(256, 256)])
    want = roi_align(feats["0"], [box], 7, spatial_scale=0.25, sampling_ratio=0, aligned=True)
    assert torch.allclose(got, want, atol=1e-6)
    big = torch.tensor([[0.0, 0.0, 250.0, 250.0]])  # FPN's rule, k = floor(4 + log2(250 / 224)): P4
    assert torch.allclose(det.roi_heads.box_roi_pool(feats, [big], [(256, 256)]),
                          roi_align(feats["2"], [big], 7, spatial_scale=1 / 16, sampling_ratio=0, aligned=True), atol=1e-6)
    mask = soco.build_finetune_detector(parse("finetune", "--backbone", "resnet18"), 3)  # Mask R-CNN, 4conv1fc
    assert type(mask).__name__ == "MaskRCNN" and isinstance(mask.roi_heads.mask_roi_pool, soco.AlignedMultiScaleRoIAlign)
    assert any(k.startswith("roi_heads.box_head.0.0.") for k in mask.state_dict())  # conv head, not TwoMLPHead


def test_box_jitter_moves_about_half_the_boxes_by_at_most_ten_percent():
    torch.manual_seed(0)
    boxes = torch.tensor([[100.0, 100.0, 200.0, 150.0]]).repeat(4000, 1)
    j = soco.jitter_boxes(boxes, 0.1, 0.5)
    moved = (j != boxes).any(1)
    assert 0.45 < moved.float().mean() < 0.55
    w, h = j[:, 2] - j[:, 0], j[:, 3] - j[:, 1]
    assert ((w - 100).abs() <= 10 + 1e-4).all() and ((h - 50).abs() <= 5 + 1e-4).all()
    cx = (j[:, 0] + j[:, 2]) / 2
    assert ((cx - 150).abs() <= 10 + 1e-4).all()


# --- Sec. 4.1 optimiser ---------------------------------------------------------------------------
def test_lars_excludes_biases_and_norms_from_decay_and_adaptation():
    model = soco.SoCo("fpn", "resnet18", proj_hidden=32)
    opt = soco.build_optimizer(model, lr=0.5, weight_decay=1e-5, momentum=0.9, trust_coeff=0.001)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in opt.param_groups:
        for p in g["params"]:
            assert (g["weight_decay"] == 0) == (p.ndim == 1), names[id(p)]
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not grouped & {id(p) for p in model.target.parameters()}  # the target is not optimised
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    # one step: a bias moves by exactly lr x grad (no adaptation); a weight by the trust-scaled step
    lin = nn.Linear(3, 2)
    opt = soco.build_optimizer(lin, lr=0.5, weight_decay=1e-5, momentum=0.9, trust_coeff=0.001)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.weight.grad, lin.bias.grad = torch.ones_like(w0), torch.ones_like(b0)
    opt.step()
    assert torch.allclose(lin.bias, b0 - 0.5)
    g = torch.ones_like(w0) + 1e-5 * w0
    trust = 0.001 * w0.norm() / (torch.ones_like(w0).norm() + 1e-5 * w0.norm())
    assert torch.allclose(lin.weight, w0 - 0.5 * trust * g, atol=1e-7)


# --- Sec. 4.2 transfer ----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,detector,box_head", [("fpn", "faster_rcnn_fpn", "4conv1fc"),
                                                     ("c4", "faster_rcnn_c4", "2mlp")])
def test_transfer_loads_every_backbone_fpn_and_head_tensor(arch, detector, box_head):
    model = soco.SoCo(arch, "resnet18", proj_hidden=32)
    sd = soco.transfer_state_dict(model)
    assert not any("projector" in k or "predictor" in k or k.startswith("target") for k in sd)
    det = build_detector(detector, 8, "resnet18", norm="bn", trainable_layers=5, box_head=box_head)
    report = load_weights(det, sd, verbose=False)
    want = {k for k in det.state_dict() if k.startswith(("backbone.", "roi_heads.box_head."))
            and not k.endswith("num_batches_tracked")}
    assert want <= set(report.loaded) and not report.unused and not report.skipped
    got = det.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in want)
    if arch == "fpn":
        assert any(k.startswith("backbone.fpn.") for k in want) and any(k.startswith("roi_heads.box_head.") for k in want)


def test_encoder_pools_each_box_from_its_level():
    enc = soco.ObjectEncoder("fpn", "resnet18", head=False).eval()
    images = torch.randn(2, 3, 224, 224)
    boxes = torch.tensor([[[0, 0, 40, 40], [0, 0, 200, 200]], [[10, 10, 100, 100], [0, 0, 150, 150]]], dtype=torch.float32)
    h = enc(images, boxes)
    assert h.shape == (4, 256)
    feats = list(enc.backbone(images).values())
    assert len(feats) == 4  # P2-P5, no P6
    from torchvision.ops import roi_align
    lvl = soco.assign_fpn_levels(boxes.reshape(-1, 4)).tolist()
    assert lvl == [0, 3, 1, 2]
    for i, (b, l) in enumerate(zip(boxes.reshape(-1, 4), lvl)):
        ref = roi_align(feats[l], torch.cat([torch.tensor([i // 2.0]), b])[None], 7, 1 / soco.FPN_STRIDES[l], 0, True)
        assert torch.allclose(h[i], ref.mean((2, 3))[0], atol=1e-5)


# --- export (Detectron2 / MMDetection) -------------------------------------------------------------
def _r50_blocks():
    """(stage 2-5, block, in, width, out) of ResNet-50's bottlenecks."""
    for s, n in zip(range(2, 6), (3, 4, 6, 3)):
        w = 64 * 2 ** (s - 2)
        for b in range(n):
            yield s, b, (64 if s == 2 else 2 * w) if b == 0 else 4 * w, w, 4 * w


def _norm(prefix, c):
    return {f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}


def detectron2_r50_fpn_layout():
    """Detectron2's R50-FPN Mask R-CNN key names and shapes (ResNet BottleneckBlock convK + .norm,
    shortcut; FPN fpn_lateralN / fpn_outputN with bias (FPN.NORM ""); FastRCNNConvFCHead conv1-4 with
    norm, no bias, then fc1 of 1024) for the tensors SoCo pre-trains."""
    out = {"backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7), **_norm("backbone.bottom_up.stem.conv1.norm", 64)}
    for s, b, cin, w, cout in _r50_blocks():
        p = f"backbone.bottom_up.res{s}.{b}"
        for j, shape in ((1, (w, cin, 1, 1)), (2, (w, w, 3, 3)), (3, (cout, w, 1, 1))):
            out[f"{p}.conv{j}.weight"] = shape
            out.update(_norm(f"{p}.conv{j}.norm", shape[0]))
        if b == 0:
            out[f"{p}.shortcut.weight"] = (cout, cin, 1, 1)
            out.update(_norm(f"{p}.shortcut.norm", cout))
    for s, c in zip(range(2, 6), (256, 512, 1024, 2048)):
        out.update({f"backbone.fpn_lateral{s}.weight": (256, c, 1, 1), f"backbone.fpn_lateral{s}.bias": (256,),
                    f"backbone.fpn_output{s}.weight": (256, 256, 3, 3), f"backbone.fpn_output{s}.bias": (256,)})
    for i in range(1, 5):
        out[f"roi_heads.box_head.conv{i}.weight"] = (256, 256, 3, 3)
        out.update(_norm(f"roi_heads.box_head.conv{i}.norm", 256))
    out.update({"roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,)})
    return out


def mmdet_r50_fpn_layout():
    """MMDetection's: ResNet (style pytorch) conv1 / bn1 / layerN.b.convJ / bnJ / downsample.0-1; FPN
    neck.lateral_convs.i.conv / neck.fpn_convs.i.conv (ConvModule, bias); Shared4Conv1FCBBoxHead
    shared_convs.i.conv (no bias) + .bn, shared_fcs.0."""
    out = {"backbone.conv1.weight": (64, 3, 7, 7), **_norm("backbone.bn1", 64)}
    for s, b, cin, w, cout in _r50_blocks():
        p = f"backbone.layer{s - 1}.{b}"
        for j, shape in ((1, (w, cin, 1, 1)), (2, (w, w, 3, 3)), (3, (cout, w, 1, 1))):
            out[f"{p}.conv{j}.weight"] = shape
            out.update(_norm(f"{p}.bn{j}", shape[0]))
        if b == 0:
            out[f"{p}.downsample.0.weight"] = (cout, cin, 1, 1)
            out.update(_norm(f"{p}.downsample.1", cout))
    for i, c in enumerate((256, 512, 1024, 2048)):
        out.update({f"neck.lateral_convs.{i}.conv.weight": (256, c, 1, 1), f"neck.lateral_convs.{i}.conv.bias": (256,),
                    f"neck.fpn_convs.{i}.conv.weight": (256, 256, 3, 3), f"neck.fpn_convs.{i}.conv.bias": (256,)})
    for i in range(4):
        out[f"roi_head.bbox_head.shared_convs.{i}.conv.weight"] = (256, 256, 3, 3)
        out.update(_norm(f"roi_head.bbox_head.shared_convs.{i}.bn", 256))
    out.update({"roi_head.bbox_head.shared_fcs.0.weight": (1024, 256 * 7 * 7), "roi_head.bbox_head.shared_fcs.0.bias": (1024,)})
    return out


def test_export_writes_detectron2_and_mmdetection_layouts(tmp_path):
    model = soco.SoCo("fpn", "resnet50", proj_hidden=32)
    weights = tmp_path / "soco_weights.pth"
    torch.save({"model": soco.transfer_state_dict(model)}, weights)
    d2 = soco.stage_export(parse("export", "--to", "detectron2", "--weights", weights, "--out", tmp_path / "d2.pkl"))
    with open(d2, "rb") as f:
        blob = pickle.load(f)
    assert blob["matching_heuristics"] is False and isinstance(blob["__author__"], str)
    assert {k: tuple(v.shape) for k, v in blob["model"].items()} == detectron2_r50_fpn_layout()
    assert isinstance(blob["model"]["backbone.fpn_lateral2.weight"], np.ndarray)
    enc = model.online["encoder"].state_dict()
    assert np.array_equal(blob["model"]["backbone.bottom_up.res4.5.conv2.norm.running_var"],
                          enc["backbone.body.layer3.5.bn2.running_var"].numpy())
    assert np.array_equal(blob["model"]["roi_heads.box_head.conv3.weight"], enc["box_head.2.0.weight"].numpy())
    mm = soco.stage_export(parse("export", "--to", "mmdet", "--weights", weights, "--out", tmp_path / "mm.pth"))
    state = torch.load(mm, weights_only=True)["state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == mmdet_r50_fpn_layout()
    assert torch.equal(state["neck.fpn_convs.3.conv.weight"], enc["backbone.fpn.layer_blocks.3.0.weight"])
    assert torch.equal(state["roi_head.bbox_head.shared_fcs.0.weight"], enc["box_head.5.weight"])
    # C4: Detectron2's backbone.stem / res2-4 and roi_heads.res5; MMDetection's roi_head.shared_head.layer4
    c4 = soco.transfer_state_dict(soco.SoCo("c4", "resnet50", proj_hidden=32))
    names = set(soco.detectron2_state_dict(c4))
    want = {k.replace("backbone.bottom_up.", "backbone.").replace("backbone.res5.", "roi_heads.res5.")
            for k in detectron2_r50_fpn_layout() if k.startswith("backbone.bottom_up.")}
    assert names == want
    mm4 = set(soco.mmdet_state_dict(c4))
    assert mm4 == {k.replace("backbone.layer4.", "roi_head.shared_head.layer4.") for k in mmdet_r50_fpn_layout()
                   if k.startswith("backbone.")}
    with pytest.raises(ValueError, match="--weights"):
        soco.stage_export(parse("export", "--out", tmp_path / "x.pkl"))


# --- smoke runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def proposals(tmp_path_factory):
    path = tmp_path_factory.mktemp("soco") / "proposals"
    soco.stage_proposals(parse("proposals", *TINY, "--ss-workers", 1, "--proposals", path))
    return path


def test_pretrain_resumes_exactly_and_writes_transferable_weights(tmp_path, proposals):
    env = init_distributed("cpu")
    common = [*TINY, "--proposals", proposals, "--epochs", 2, "--checkpoint-every", 1]
    soco.stage_pretrain(parse(*common, "--out", tmp_path / "full"), env)
    soco.stage_pretrain(parse(*common, "--out", tmp_path / "part", "--max-steps", 3), env)
    assert load_checkpoint(tmp_path / "part" / "checkpoint.pth")["step"] == 3
    soco.stage_pretrain(parse(*common, "--out", tmp_path / "part", "--resume", "auto"), env)
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pth"), load_checkpoint(tmp_path / "part" / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    assert any(k.startswith("target.") for k in a["model"])  # the momentum network is checkpointed
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    w = load_checkpoint(tmp_path / "full" / "soco_weights.pth")["model"]
    assert any(k.startswith("backbone.fpn.") for k in w) and any(k.startswith("roi_heads.box_head.") for k in w)


def test_amp_pretrain_step_on_the_cpu_and_a_missing_resume_path(tmp_path, proposals, monkeypatch):
    env = init_distributed("cpu")
    dtypes = record_autocast(monkeypatch, soco)
    soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--max-steps", 1, "--amp", "--out", tmp_path), env)
    assert dtypes == [torch.bfloat16]  # --amp on the CPU: bfloat16 autocast
    log = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert log["step"] == 1 and math.isfinite(log["loss"])
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--out", tmp_path, "--resume", tmp_path / "nope.pth"),
                            env)


@pytest.mark.parametrize("flags", [["--arch", "c4"], ["--star", "--proposals-kind", "random", "--no-scale-aware"],
                                   ["--no-fpn", "--no-head", "--no-v3", "--proposals-kind", "whole"]])
def test_pretrain_variants_and_ablations_run(tmp_path, proposals, flags):
    env = init_distributed("cpu")
    soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--max-steps", 1, "--out", tmp_path, *flags), env)
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 1


def test_finetune_from_soco_weights(tmp_path, proposals):
    env = init_distributed("cpu")
    soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--max-steps", 1, "--out", tmp_path / "pre"), env)
    metrics = soco.stage_finetune(parse(
        "finetune", *TINY, "--weights", tmp_path / "pre" / "soco_weights.pth", "--synthetic-images", 20,
        "--fraction", 0.5, "--det-iters", 2, "--det-batch-size", 2, "--det-norm", "bn", "--det-scales", 64,
        "--det-max-size", 64, "--det-test-size", 64, "--anchor-sizes", 16, 32, 64, 128, 256,
        "--box-batch-per-image", 16, "--test-proposals", 20, "--test-images", 4, "--out", tmp_path / "ft"), env)
    assert metrics["train_images"] == 10 and {"AP", "AP50", "AP75"} <= set(metrics)
    assert (tmp_path / "ft" / "split.json").is_file()


def test_demo_runs_end_to_end_and_writes_demo_json(tmp_path, monkeypatch):
    monkeypatch.setattr(soco, "DEMO", dict(soco.DEMO, pre_images=8, epochs=1, batch_size=4, scenes=40, fraction=0.25,
                                           ft_steps=8, test_scenes=4, proj_hidden=32))
    results = soco.run_demo(parse("--demo", "--demo-byol", "--seed", 3, "--out", tmp_path), init_distributed("cpu"))
    assert set(results) == {"random init", "SoCo", "BYOL (whole image)"} and not parse("--demo").demo_byol
    obj = json.loads((tmp_path / "demo.json").read_text())
    assert {"proposals (selective search)", "pre-training SoCo", "fine-tuning from SoCo",
            "evaluation of random init"} <= set(obj["tables"]["stages"])
    ft = obj["tables"]["finetune"]["SoCo"]  # backbone, FPN and box head transfer; RPN and predictor do not
    assert ft["tensors_transferred"] > 100 and {"rpn.head", "roi_heads.box_predictor"} <= set(ft["left_at_init"])
    assert not any(k.startswith(("backbone", "roi_heads.box_head")) for k in ft["left_at_init"])
    assert obj["script"] == "soco.py" and obj["seed"] == 3
    c = obj["claims"][0]
    assert (c["metric"], c["better"]["name"], c["worse"]["name"]) == ("AP50", "SoCo", "random init")
    assert c["better"]["value"] == results["SoCo"]["AP50"] and obj["tables"]["labelled_images"] == 10
    w = load_checkpoint(tmp_path / "pretrain_selective_search" / "soco_weights.pth")["model"]
    assert "roi_heads.box_head.fc6.weight" in w  # the demo detector's head is pre-trained and transferred
    assert parse("--demo").demo and parse().stage == "pretrain" and parse().epochs == 100


def test_demo_takes_its_budget_flags_and_refuses_the_ones_it_sets():
    # a budget flag given with --demo replaces DEMO's value (it was silently ignored before)
    a = soco.parse_args(["--demo", "--trust-coeff", "0.02", "--epochs", "2"])
    d = soco.demo_settings(a)
    assert (d["trust_coeff"], d["epochs"], d["batch_size"]) == (0.02, 2, soco.DEMO["batch_size"])
    assert soco.demo_pretrain_args(a, Path("x"), "selective_search", 1).trust_coeff == 0.02
    b = soco.demo_settings(soco.parse_args(["--demo", "--batch-size", "64"]))
    assert b["batch_size"] == 64 and b["trust_coeff"] == soco.DEMO["trust_coeff"]
    assert soco.demo_settings(soco.parse_args(["--demo"])) == soco.DEMO
    for flag in (["--det-iters", "5"], ["--backbone", "resnet50"], ["--amp"], ["finetune"]):
        with pytest.raises(SystemExit):  # the demo sets these itself: an error, not ignored
            soco.parse_args(["--demo", *flag])
    assert soco.parse_args(["--epochs", "3"]).epochs == 3  # without --demo nothing changes


def test_demo_pre_mode_picks_the_pre_training_images(monkeypatch):
    # object-centric images by default (ImageNet's role); "unlabeled": scenes of the fine-tuning domain (Tab. 9)
    args = soco.parse_args(["--demo"])
    assert soco.build_image_source(soco.demo_pretrain_args(args, Path("x"), "selective_search", 1)).mode == "object"
    monkeypatch.setattr(soco, "DEMO", dict(soco.DEMO, pre_mode="unlabeled"))
    source = soco.build_image_source(soco.demo_pretrain_args(args, Path("x"), "selective_search", 1))
    assert source.mode == "unlabeled" and len(source) == soco.DEMO["pre_images"]


def test_effective_rank_counts_the_directions_used():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, 8, generator=g)
    line = torch.randn(4000, 1, generator=g) * torch.ones(1, 8) + 1e-4 * torch.randn(4000, 8, generator=g)
    assert soco.effective_rank(spread) == pytest.approx(8, rel=0.02)  # every direction, equally
    assert soco.effective_rank(line) == pytest.approx(1, abs=0.01)  # collapsed onto one line


def test_cli_defaults_are_the_papers():
    a = parse()
    assert (a.batch_size, a.base_lr, a.weight_decay, a.warmup_epochs, a.tau) == (2048, 1.0, 1e-5, 10, 0.99)
    assert (a.num_proposals, a.view_size, a.v3_size, a.v4_size, soco.crop_scale(a)) == (4, 224, 112, 192, (0.5, 1.0))
    assert a.det_arch == "mask_rcnn_fpn" and a.cutout_prob == 0.0  # Tab. 1-2's detector; the paper has no cutout
    assert (a.jitter, a.jitter_prob, a.proj_hidden, a.proj_dim, a.arch) == (0.1, 0.5, 4096, 256, "fpn")
    assert not (a.star or a.no_fpn or a.no_head or a.no_scale_aware or a.no_jitter or a.no_v3)
    assert a.proposals_kind == "selective_search" and a.ss_mode == "fast" and a.v3_crop == "downsample"


def test_torchrun_two_processes(tmp_path, proposals):
    run_torchrun(["soco.py", *TINY, "--proposals", proposals, "--max-steps", 2, "--out", tmp_path])
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 2
    assert (tmp_path / "soco_weights.pth").is_file()


def test_imagefolder_images_get_proposals_and_views(tmp_path):
    from common.synthetic import SyntheticDetection, export_imagefolder

    export_imagefolder(SyntheticDetection(4, 80, mode="object", seed=1), tmp_path / "imagenet" / "train")
    argv = ["--data", tmp_path / "imagenet", "--proposals", tmp_path / "props", "--view-size", 64, "--v3-size", 32]
    table = soco.stage_proposals(parse("proposals", *argv, "--ss-workers", 1))
    assert len(table) == 4 and table.meta["source"].startswith("sha1:")
    args = parse(*argv)
    ds = soco.SoCoViews(soco.build_image_source(args), table, args)
    images, boxes = ds[0]
    assert [im.shape[-1] for im in images] == [64, 64, 32] and all(b["boxes"].shape == (4, 4) for b in boxes)


def test_views_dataset_pickles_without_the_proposal_arrays(tmp_path):
    """What a spawned DataLoader worker receives: the table's path, not its 10,000 boxes."""
    rng = np.random.default_rng(0)
    boxes = [rng.integers(0, 64, (10, 4)).astype(np.uint16) for _ in range(1000)]
    table = write_proposals(tmp_path, boxes, [(64, 64)] * 1000)
    ds = soco.SoCoViews(SyntheticDetection(1000, 64, mode="unlabeled"), table, parse("--view-size", 64))
    ds.geometry(5)  # the maps are open now
    blob = pickle.dumps(ds)
    assert len(blob) < 20_000, len(blob)  # the boxes alone are 80 KB
    assert pickle.loads(blob).proposals[5]["boxes"].tolist() == boxes[5].tolist()


def test_pretrain_accumulates_gradients_to_the_global_batch(tmp_path, proposals, capsys):
    env = init_distributed("cpu")
    soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--accum-steps", 2, "--epochs", 1, "--out", tmp_path), env)
    out = capsys.readouterr().out
    assert "2 steps/epoch" in out and "2/rank x 1 x 2 accumulated" in out
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 2  # 8 images: 4 micro-batches of 2, 2 updates of 4
    with pytest.raises(ValueError, match="--accum-steps 3"):
        soco.stage_pretrain(parse(*TINY, "--proposals", proposals, "--accum-steps", 3, "--out", tmp_path / "x"), env)
