"""The data pipelines as they were before issue 19 (frozen copies of the functions it replaced), kept
for the before / after figures of `bench_pipelines.py --before` and for the tests that compare the
new pipelines' outputs with these, in distribution, on fixed seeds. Only the replaced functions are
copied; everything else is the scripts' own, so these follow the scripts' other changes."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import dap
import jigsaw
import soco
import ssod_certainty


# soco.py -------------------------------------------------------------------------------------
def reference_byol_augment(size: int, blur_p: float, solarize_p: float) -> v2.Compose:
    """soco.byol_augment before issue 19: torchvision's tensor kernels (blur as soco.blur_params)."""
    kernel, sigma = soco.blur_params(size)
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])


class ReferenceSoCoViews(soco.SoCoViews):
    def __init__(self, source, proposals, args):
        super().__init__(source, proposals, args)
        S = args.view_size
        self.aug_v1 = reference_byol_augment(S, blur_p=1.0, solarize_p=0.0)
        self.aug_v2 = self.aug_v3 = self.aug_v4 = reference_byol_augment(S, blur_p=0.1, solarize_p=0.2)


# ssod_certainty.py ---------------------------------------------------------------------------
def reference_strong_augmentation(args) -> v2.Compose:
    """ssod_certainty.strong_augmentation before issue 19: tensor kernels on the float weak view."""
    ops = []
    if args.color_jitter:
        ops += [v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(p=0.2)]
    if args.blur:
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=0.5))
    if args.cutout:  # Cutout as three random erasings of decreasing probability (Unbiased Teacher)
        ops += [v2.RandomErasing(p=0.7, scale=(0.05, 0.2), ratio=(0.3, 3.3), value="random"),
                v2.RandomErasing(p=0.5, scale=(0.02, 0.2), ratio=(0.1, 6), value="random"),
                v2.RandomErasing(p=0.3, scale=(0.02, 0.2), ratio=(0.05, 8), value="random")]
    return v2.Compose(ops or [v2.Identity()])


ReferenceSemiSupervisedSet = ssod_certainty.SemiSupervisedSet


# dap.py ----------------------------------------------------------------------------------------
class ReferenceCamInputs(dap.CamInputs):
    """dap.CamInputs before issue 19: each image resized as float."""

    def __call__(self, batch):
        indices, images, labels = zip(*[(i, img, lab) for i, (img, lab) in batch])
        sizes = torch.tensor([img.shape[-2:] for img in images])
        per_scale = []
        for s in self.scales:
            resized = []
            for img in images:
                h, w = img.shape[-2:]
                f = s / min(h, w)
                nh, nw = max(1, round(h * f)), max(1, round(w * f))
                x = F.interpolate(img[None].float() / 255, size=(nh, nw), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
                resized.append((x.clamp(0, 1) - self.mean) / self.std)
            grid = torch.tensor([[math.ceil(x.shape[1] / dap.STRIDE), math.ceil(x.shape[2] / dap.STRIDE)]
                                 for x in resized])
            canvas = torch.zeros(len(resized), 3, int(grid[:, 0].max()) * dap.STRIDE, int(grid[:, 1].max()) * dap.STRIDE)
            for k, x in enumerate(resized):
                canvas[k, :, : x.shape[1], : x.shape[2]] = x
            per_scale.append((canvas, grid))
        return per_scale, torch.tensor(labels), torch.tensor(indices), sizes


# jigsaw.py -------------------------------------------------------------------------------------
def reference_fit_to_region(crop, hw, mode, scale, flip):
    """jigsaw.fit_to_region before issue 19 (float)."""
    H, W = hw
    h, w = crop.shape[-2:]
    if mode == "warp":
        size = (H, W)
    elif mode == "resize":
        f = min(H / h, W / w)
        size = (max(1, min(H, round(h * f))), max(1, min(W, round(w * f))))
    else:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
    x = F.interpolate(crop[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        x = x.flip(-1)
    out = torch.zeros(3, H, W)
    h, w = x.shape[-2:]
    sy, sx = int(torch.randint(0, max(0, h - H) + 1, ())), int(torch.randint(0, max(0, w - W) + 1, ()))
    dy, dx = int(torch.randint(0, max(0, H - h) + 1, ())), int(torch.randint(0, max(0, W - w) + 1, ()))
    x = x[:, sy:sy + H, sx:sx + W]
    out[:, dy:dy + x.shape[1], dx:dx + x.shape[2]] = x
    return out


class ReferenceJigsawAssembly(jigsaw.JigsawAssembly):
    """jigsaw.JigsawAssembly before issue 19: every sample cut from its whole decoded image, float."""

    def crop(self, k: int) -> torch.Tensor:
        image = self.dataset[int(self.image_index[k])][0]  # (3, H, W) uint8
        H, W = image.shape[-2:]
        x1, y1, x2, y2 = self.boxes[k]
        x1, y1 = min(int(math.floor(x1)), W - 1), min(int(math.floor(y1)), H - 1)
        x2, y2 = max(int(math.ceil(x2)), x1 + 1), max(int(math.ceil(y2)), y1 + 1)
        return image[:, y1:y2, x1:x2].float() / 255

    def __getitem__(self, i: int):
        t = self.template
        canvas = torch.zeros(3, t.size, t.size)
        chosen = self.choose()
        for k, (x1, y1, x2, y2) in zip(chosen, t.boxes):
            scale = float(torch.empty(()).uniform_(*self.scale_range))
            flip = bool(torch.rand(()) < 0.5)
            canvas[:, y1:y2, x1:x2] = reference_fit_to_region(self.crop(k), (y2 - y1, x2 - x1), self.fit, scale, flip)
        canvas = (canvas - torch.tensor(jigsaw.MEAN)[:, None, None]) / torch.tensor(jigsaw.STD)[:, None, None]
        return canvas, {"region_labels": torch.as_tensor([int(self.labels[k]) for k in chosen], dtype=torch.long)}


def reference_jigsaw_data(args) -> ReferenceJigsawAssembly:
    new = jigsaw.build_pretrain_data(args)  # extracts the table once
    return ReferenceJigsawAssembly(new.dataset, jigsaw.load_sample_table(Path(args.samples or Path(args.out) / "samples")),
                                   new.template, new.fit, new.scale_range)
