"""Detector builders on `torchvision.models.detection`, and one loader that moves weights between
classifiers, FPN detectors and C4 detectors of any origin (torchvision, timm, this project)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torchvision.models import get_model_weights, resnet as tv_resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from .distributed import get_world_size

ARCHS = ("faster_rcnn_fpn", "faster_rcnn_c4", "retinanet", "mask_rcnn")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_32x8d")
# Layers whose shape depends on the label set: never transferred between tasks.
CLASS_SPECIFIC = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.",
                  "head.classification_head.cls_logits.", "fc.")


def norm_layer_for(norm: str):
    """frozen_bn (fine-tuning), bn, syncbn (converted when the world is > 1), gn (32 groups)."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c)
    raise ValueError(f"unknown norm {norm!r}; choose frozen_bn, bn, syncbn or gn")


def is_torchvision(pretrained) -> bool:
    """Whether `pretrained` names torchvision's weights: "torchvision" or "torchvision:<NAME>"."""
    return isinstance(pretrained, str) and (pretrained == "torchvision" or pretrained.startswith("torchvision:"))


def torchvision_weights(backbone: str, pretrained):
    """The member of torchvision's weights enum that `pretrained` names for `backbone` (None when it
    names no torchvision weights). "torchvision" is IMAGENET1K_V1, the original ImageNet weights
    (76.1% top-1 for ResNet-50) that every paper here used and torchvision's own detectors are
    built on; torchvision's "DEFAULT" is IMAGENET1K_V2 for ResNet-50/101 (80.9%, a long augmented
    recipe), so ask for it explicitly: "torchvision:IMAGENET1K_V2" (any member name of the enum)."""
    if not is_torchvision(pretrained):
        return None
    enum = get_model_weights(backbone)
    name = pretrained.partition(":")[2] or "IMAGENET1K_V1"
    try:
        return enum[name]
    except KeyError:
        raise ValueError(f"pretrained={pretrained!r}: {enum.__name__} has no weights {name!r}; choose one of "
                         f"{[f'torchvision:{w.name}' for w in enum]}") from None


def _resnet(backbone: str, norm: str, pretrained, num_classes: int = 1000) -> tv_resnet.ResNet:
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {BACKBONES}")
    weights = torchvision_weights(backbone, pretrained)  # from the user's torch hub cache
    return getattr(tv_resnet, backbone)(weights=weights, norm_layer=norm_layer_for(norm),
                                        num_classes=1000 if weights is not None else num_classes)


def build_classifier(backbone: str = "resnet50", num_classes: int = 1000, norm: str = "bn",
                     pretrained=None) -> tv_resnet.ResNet:
    """A torchvision ResNet classifier (keys conv1.*, layer1-4.*, fc.*). `pretrained`: None,
    "torchvision" / "torchvision:<NAME>" (see `torchvision_weights`), or what `load_weights` takes."""
    model = _resnet(backbone, norm, pretrained, num_classes)
    if is_torchvision(pretrained) and num_classes != model.fc.out_features:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    if pretrained is not None and not is_torchvision(pretrained):
        load_weights(model, pretrained)
    return model


class C4Backbone(nn.Module):
    """conv1 .. res4 of a ResNet (stride 16), named `body` like torchvision's FPN backbones so that
    weights move between C4 and FPN detectors under the same names."""

    def __init__(self, body: tv_resnet.ResNet):
        super().__init__()
        self.body = IntermediateLayerGetter(body, {"layer3": "0"})
        self.out_channels = body.inplanes // 2  # C4 width (1024 for R50, 256 for R18)

    def forward(self, x):
        return self.body(x)


class ResNetC5Head(nn.Module):
    """The R-CNN head of a C4 detector: res5 (layer4) on 14x14 RoI features, then average pooling."""

    def __init__(self, layer4: nn.Module):
        super().__init__()
        self.layer4 = layer4

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.layer4(x), 1), 1)


def _freeze(module: nn.Module, trainable: list[str]) -> None:
    for name, p in module.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            p.requires_grad_(False)


def build_detector(arch: str, num_classes: int, backbone: str = "resnet50", norm: str = "frozen_bn",
                   trainable_layers: int = 3, min_size: int = 800, max_size: int = 1333, pretrained=None,
                   box_head: str = "2mlp", anchor_sizes=None, **kwargs) -> nn.Module:
    """A torchvision detector for `num_classes` object classes (labels 1..C; background added).

    - `arch`: faster_rcnn_fpn, faster_rcnn_c4 (RoIAlign 14x14 on C4, res5 as the box head),
      retinanet (P3-P5 from the FPN, P6 a stride-2 conv on C5, P7 on ReLU(P6): the paper and
      Detectron2; torchvision's retinanet_resnet50_fpn takes P6 from P5), mask_rcnn (FPN).
    - `norm`: frozen_bn / bn / syncbn / gn in the ResNet; `trainable_layers`: as torchvision's
      (5 = everything trains, 3 = stem and res2 frozen, 0 = backbone frozen).
    - `box_head`: "2mlp" (torchvision's TwoMLPHead) or "4conv1fc" (4 conv 3x3 with BN + fc 1024).
    - `anchor_sizes`: base anchor size per pyramid level (defaults: torchvision's, 32..512); small
      synthetic images want smaller ones.
    - `pretrained`: None, "torchvision" (torchvision's IMAGENET1K_V1 ImageNet weights, from the local
      hub cache), "torchvision:<NAME>" (another member of the weights enum, e.g. IMAGENET1K_V2), "timm:<name>"
      (timm's weights, e.g. "timm:resnet50.a1_in1k", from the local Hugging Face cache), or a path
      given to `load_weights` (any classifier/detector checkpoint; class-specific layers skipped).
    - Training images are resized by the data pipeline (`common.data.detection_transforms`), so the
      model's own training-time resize is skipped; at evaluation it resizes to `min_size` and maps
      its boxes back to the original image.
    Extra `kwargs` go to the torchvision constructor (rpn_batch_size_per_image, box_detections_per_img, ...).
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {ARCHS}")
    body = _resnet(backbone, norm, pretrained)
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    common = dict(min_size=min_size, max_size=max_size, _skip_resize=True, **kwargs)
    bn = nn.BatchNorm2d if norm != "gn" else (lambda c: nn.GroupNorm(32, c))

    if arch == "faster_rcnn_c4":
        layer4 = body.layer4
        _freeze(body, trainable)
        feats = C4Backbone(body)
        sizes = anchor_sizes or (32, 64, 128, 256, 512)
        anchors = AnchorGenerator((tuple(sizes),), ((0.5, 1.0, 2.0),))
        head = ResNetC5Head(layer4)
        width = body.inplanes  # res5 width (2048 / 512)
        model = FasterRCNN(feats, num_classes=None, rpn_anchor_generator=anchors,
                           box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0), box_head=head,
                           box_predictor=FastRCNNPredictor(width, num_classes + 1), **common)
    else:
        if arch == "retinanet":  # P3-P5 from the FPN, P6 from C5 and P7 from P6 (RetinaNet paper, Detectron2)
            extra = LastLevelP6P7(body.inplanes, 256)  # in_channels: C5's width (2048 / 512)
            extra.use_P5 = False  # torchvision picks P5 when C5 has 256 channels; C5 always here
            feats = _resnet_fpn_extractor(body, trainable_layers, returned_layers=[2, 3, 4], extra_blocks=extra)
        else:
            feats = _resnet_fpn_extractor(body, trainable_layers)
        if arch == "retinanet":
            base = anchor_sizes or (32, 64, 128, 256, 512)
            sizes = tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in base)
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            model = RetinaNet(feats, num_classes + 1, anchor_generator=anchors, **common)
        else:
            sizes = tuple((s,) for s in (anchor_sizes or (32, 64, 128, 256, 512)))
            anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
            extra = {}
            if box_head == "4conv1fc":
                extra["box_head"] = FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=bn)
                extra["box_predictor"] = FastRCNNPredictor(1024, num_classes + 1)
                if arch == "mask_rcnn":  # num_classes goes to the constructor as None: the mask predictor too
                    extra["mask_predictor"] = MaskRCNNPredictor(256, 256, num_classes + 1)
            elif box_head != "2mlp":
                raise ValueError(f"unknown box head {box_head!r}; choose 2mlp or 4conv1fc")
            ctor = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
            model = ctor(feats, num_classes=None if extra else num_classes + 1, rpn_anchor_generator=anchors,
                         **extra, **common)
    if norm == "syncbn" and get_world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if pretrained is not None and not is_torchvision(pretrained):
        load_weights(model, pretrained)
    return model


# --------------------------------------------------------------------------------------------
# One weight loader for every checkpoint of the project, torchvision and timm
# --------------------------------------------------------------------------------------------
_C4_HEAD = "roi_heads.box_head.layer4."


def _canonical(key: str) -> str:
    """Name a tensor by what it is, whatever model holds it: ResNet tensors become `resnet.<name>`
    (plain classifier, FPN detector `backbone.body.`, C4 detector's res5 head)."""
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("backbone.body."):
        return "resnet." + key[len("backbone.body."):]
    if key.startswith(_C4_HEAD):
        return "resnet.layer4." + key[len(_C4_HEAD):]
    if key.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        return "resnet." + key
    return key


@dataclass
class LoadReport:
    loaded: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # (key, reason)
    missing: list = field(default_factory=list)  # model keys left at their initialisation
    unused: list = field(default_factory=list)  # checkpoint keys with no place in the model

    def summary(self) -> str:
        def groups(keys):
            c = Counter(".".join(k.rsplit(".", 1)[0].split(".")[:2]) for k in keys)
            return ", ".join(f"{g}.* ({n})" for g, n in sorted(c.items())) or "none"
        lines = [f"loaded {len(self.loaded)} tensors: {groups(self.loaded)}"]
        if self.skipped:
            reasons = Counter(r for _, r in self.skipped)
            lines.append(f"skipped {len(self.skipped)}: " + "; ".join(f"{n} {r}" for r, n in reasons.items())
                         + f" [{groups(k for k, _ in self.skipped)}]")
        lines.append(f"left at initialisation {len(self.missing)}: {groups(self.missing)}")
        if self.unused:
            lines.append(f"unused from the checkpoint {len(self.unused)}: {groups(self.unused)}")
        return "\n".join(lines)


def read_state_dict(source) -> dict:
    """A state dict of tensors from a path (loaded with weights_only=True), "timm:<name>", a
    checkpoint dict holding one under 'model' / 'state_dict', or a state dict itself."""
    if isinstance(source, str) and source.startswith("timm:"):  # timm weights from the local HF cache
        import timm

        return timm.create_model(source[len("timm:"):], pretrained=True).state_dict()
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
            raise ValueError(f"cannot load {path} with weights_only=True ({e.__class__.__name__}: {e}); "
                             f"it is not a plain state dict or checkpoint of tensors") from e
    for key in ("model", "state_dict", "model_state"):
        if isinstance(source, dict) and isinstance(source.get(key), dict):
            source = source[key]
    if not isinstance(source, dict) or not all(torch.is_tensor(v) for v in source.values()):
        raise ValueError("weights must be a state dict of tensors, or a checkpoint dict holding one "
                         "under 'model' or 'state_dict'")
    return source


def load_weights(model: nn.Module, source, skip_class_specific: bool = True, verbose: bool = True) -> LoadReport:
    """Copy every tensor of `source` (a path, "timm:<name>", or a state dict) that has a place in `model`, matching by canonical name
    (plain ResNet <-> FPN detector <-> C4 detector) and shape. Class-specific layers (box/mask
    predictors, RetinaNet's class logits, a classifier's fc) are skipped when
    `skip_class_specific`. Raises ValueError when nothing fits."""
    sd = read_state_dict(source)
    target = model.state_dict()
    by_name = {_canonical(k): k for k in target}
    report, new = LoadReport(), {}
    for key, value in sd.items():
        canon = _canonical(key)
        if canon.endswith("num_batches_tracked"):
            continue
        if canon not in by_name:
            report.unused.append(key)
            continue
        tkey = by_name[canon]
        if skip_class_specific and any(tkey.startswith(p) or canon.startswith(p) for p in CLASS_SPECIFIC):
            report.skipped.append((tkey, "class-specific"))
        elif target[tkey].shape != value.shape:
            report.skipped.append((tkey, "shape mismatch"))
        else:
            new[tkey] = value
            report.loaded.append(tkey)
    if not new:
        example_src = ", ".join(list(sd)[:3])
        example_dst = ", ".join(list(target)[:3])
        raise ValueError(f"the checkpoint does not fit the model: none of its {len(sd)} tensors match by "
                         f"name and shape (checkpoint keys like {example_src}; model keys like {example_dst})")
    model.load_state_dict(new, strict=False)
    done = set(report.loaded) | {k for k, _ in report.skipped}
    report.missing = [k for k in target if k not in done and not k.endswith("num_batches_tracked")]
    if verbose:
        print(report.summary())
    return report


def backbone_state_dict(model: nn.Module) -> dict:
    """The ResNet tensors of any classifier or detector, under plain ResNet names (conv1.*, layer1.*)."""
    out = {}
    for k, v in model.state_dict().items():
        canon = _canonical(k)
        if canon.startswith("resnet."):
            out[canon[len("resnet."):]] = v
    return out
