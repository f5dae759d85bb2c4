"""common.detectors: every architecture builds, trains a step and predicts on the CPU; the one
weight loader maps keys between classifiers, FPN and C4 detectors and refuses what does not fit."""
import pickle

import pytest
import torch

from common.data import collate_detection, detection_transforms
from common.synthetic import SyntheticDetection
from common.detectors import backbone_state_dict, build_classifier, build_detector, load_weights

SMALL = dict(backbone="resnet18", min_size=64, max_size=96, anchor_sizes=(16, 32, 64, 128, 256))
SAMPLES = dict(rpn_batch_size_per_image=32, box_batch_size_per_image=32, rpn_pre_nms_top_n_test=100,
               rpn_post_nms_top_n_test=50, box_detections_per_img=10)


@pytest.fixture(scope="module")
def batch():
    ds = SyntheticDetection(2, 64, seed=0, transforms=detection_transforms(True, scales=(64,), max_size=96))
    return collate_detection([ds[i] for i in range(2)])


@pytest.mark.parametrize("arch", ["faster_rcnn_fpn", "faster_rcnn_c4", "retinanet", "mask_rcnn"])
def test_build_train_step_and_predict(arch, batch):
    torch.manual_seed(0)
    extra = dict(topk_candidates=50, detections_per_img=10) if arch == "retinanet" else SAMPLES
    model = build_detector(arch, 8, **SMALL, **extra)
    images, targets = batch
    losses = model(list(images), list(targets))
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("conv1" in n for n in frozen) and any("layer1" in n for n in frozen)  # stem + res2
    assert not any("layer2" in n for n in frozen)
    model.eval()
    with torch.no_grad():
        out = model([images[0]])[0]
    assert set(out) >= {"boxes", "scores", "labels"} and out["boxes"].shape[-1] == 4


def test_norm_choices_and_trainable_layers():
    from torchvision.ops import FrozenBatchNorm2d

    m = build_detector("faster_rcnn_fpn", 3, backbone="resnet18", norm="gn", trainable_layers=5)
    assert any(isinstance(x, torch.nn.GroupNorm) for x in m.modules())
    assert all(p.requires_grad for p in m.parameters())
    m = build_detector("faster_rcnn_fpn", 3, backbone="resnet18")
    assert isinstance(m.backbone.body.bn1, FrozenBatchNorm2d)
    m = build_detector("faster_rcnn_fpn", 3, backbone="resnet18", box_head="4conv1fc", norm="bn")
    assert sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.roi_heads.box_head.modules()) == 4


def test_classifier_to_fpn_and_c4_transfer(tmp_path):
    cls = build_classifier("resnet18", 8)
    torch.save({"model": cls.state_dict()}, tmp_path / "cls.pth")
    fpn = build_detector("faster_rcnn_fpn", 5, backbone="resnet18")
    report = load_weights(fpn, tmp_path / "cls.pth", verbose=False)
    assert all(k.startswith("backbone.body.") for k in report.loaded)
    assert not [k for k in report.missing if k.startswith("backbone.body.")]
    ref = backbone_state_dict(cls)
    got = backbone_state_dict(fpn)
    assert all(torch.equal(got[k], ref[k]) for k in got if "num_batches" not in k)
    c4 = build_detector("faster_rcnn_c4", 5, backbone="resnet18", pretrained=str(tmp_path / "cls.pth"))
    assert torch.equal(c4.roi_heads.box_head.layer4[0].conv1.weight, cls.layer4[0].conv1.weight)
    assert torch.equal(c4.backbone.body.layer3[1].conv2.weight, cls.layer3[1].conv2.weight)


def test_detector_transfer_skips_class_specific_layers(tmp_path):
    torch.manual_seed(0)
    src = build_detector("faster_rcnn_fpn", 20, backbone="resnet18", box_head="4conv1fc")
    torch.save({"model": src.state_dict(), "args": {"arch": "x"}}, tmp_path / "det.pth")
    dst = build_detector("faster_rcnn_fpn", 20, backbone="resnet18", box_head="4conv1fc")
    report = load_weights(dst, tmp_path / "det.pth", verbose=False)
    assert {k for k, _ in report.skipped} == {f"roi_heads.box_predictor.{n}.{p}" for n in ("cls_score", "bbox_pred")
                                             for p in ("weight", "bias")}
    assert not report.missing  # the skipped predictor is reported as skipped, not missing
    assert torch.equal(dst.backbone.fpn.inner_blocks[0][0].weight, src.backbone.fpn.inner_blocks[0][0].weight)
    assert torch.equal(dst.roi_heads.box_head[0][0].weight, src.roi_heads.box_head[0][0].weight)
    full = load_weights(build_detector("faster_rcnn_fpn", 20, backbone="resnet18", box_head="4conv1fc"),
                        tmp_path / "det.pth", skip_class_specific=False, verbose=False)
    assert not full.missing


def test_bad_checkpoints_are_refused(tmp_path):
    model = build_detector("faster_rcnn_fpn", 3, backbone="resnet18")
    torch.save({"model": {"foo.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit the model"):
        load_weights(model, tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        load_weights(model, tmp_path / "missing.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(ValueError, match="weights_only=True"):
        load_weights(model, tmp_path / "evil.pth")
    big = build_detector("faster_rcnn_fpn", 3, backbone="resnet50")
    torch.save(big.state_dict(), tmp_path / "r50.pth")
    report = load_weights(model, tmp_path / "r50.pth", verbose=False)  # r50 -> r18: shapes differ
    assert any(r == "shape mismatch" for _, r in report.skipped)


def test_timm_resnet_keys_map_into_detectors():
    import timm

    src = timm.create_model("resnet18", pretrained=False, num_classes=10)
    det = build_detector("faster_rcnn_c4", 3, backbone="resnet18")
    report = load_weights(det, src.state_dict(), verbose=False)
    assert not [k for k in report.missing if k.startswith(("backbone.body.", "roi_heads.box_head."))]
    assert torch.equal(det.roi_heads.box_head.layer4[1].conv2.weight, src.layer4[1].conv2.weight)


def test_torchvision_means_imagenet1k_v1_and_v2_is_explicit(torchvision_hub):
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    cls = build_classifier("resnet50", 10, pretrained="torchvision")
    assert torchvision_hub == [ResNet50_Weights.IMAGENET1K_V1]  # torchvision's DEFAULT would be V2
    assert cls.fc.out_features == 10 and (cls.conv1.weight == 0.25).all()
    build_classifier("resnet50", 1000, pretrained="torchvision:IMAGENET1K_V2")
    assert torchvision_hub[-1] == ResNet50_Weights.IMAGENET1K_V2
    det = build_detector("faster_rcnn_fpn", 3, backbone="resnet18", pretrained="torchvision")
    assert torchvision_hub[-1] == ResNet18_Weights.IMAGENET1K_V1 and (det.backbone.body.conv1.weight == 0.25).all()
    with pytest.raises(ValueError, match="torchvision:IMAGENET1K_V1"):  # resnet18 has V1 only: say so
        build_detector("retinanet", 3, backbone="resnet18", pretrained="torchvision:IMAGENET1K_V2")


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_retinanet_p6_is_computed_from_c5(backbone):
    model = build_detector("retinanet", 3, backbone=backbone).eval()
    extra = model.backbone.fpn.extra_blocks
    c5_channels = 512 if backbone == "resnet18" else 2048
    assert extra.p6.in_channels == c5_channels and extra.p7.in_channels == 256
    seen = {}
    extra.p6.register_forward_hook(lambda m, inp, out: seen.update(p6_in=inp[0], p6=out))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        levels = model.backbone(x)
        c5 = model.backbone.body(x)["2"]  # layer4's output
    assert torch.equal(seen["p6_in"], c5) and torch.equal(levels["p6"], seen["p6"])
    assert list(levels) == ["0", "1", "2", "p6", "p7"] and levels["p6"].shape[-1] == 1 and levels["p7"].shape[1] == 256


def test_mask_rcnn_with_the_4conv1fc_head_builds_and_trains():
    """Mask R-CNN with the 4conv1fc box head (SoCo's Tab. 1-2 detector) crashed: the mask predictor
    was built for num_classes=None."""
    model = build_detector("mask_rcnn", 3, "resnet18", norm="bn", trainable_layers=5, box_head="4conv1fc",
                           min_size=64, max_size=64)
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4  # 3 classes + background
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 10:40, 12:30] = 1
    target = {"boxes": torch.tensor([[12.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([2]), "masks": masks}
    losses = model([torch.rand(3, 64, 64)], [target])
    assert "loss_mask" in losses and all(torch.isfinite(v) for v in losses.values())
