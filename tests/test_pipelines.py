"""Issue 19's fast data pipelines against the ones they replaced (benchmarks/reference_pipelines.py):
the same random draws on fixed seeds (so the same boxes, crops and coin flips) and outputs within a
grey level or two, pixel by pixel and in distribution."""
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from benchmarks import reference_pipelines as ref
from common import augment
from common.data import SeededDataset, detection_transforms
from common.synthetic import SyntheticDetection

MEAN = torch.tensor((0.485, 0.456, 0.406))[:, None, None]
STD = torch.tensor((0.229, 0.224, 0.225))[:, None, None]


@pytest.fixture(scope="module")
def image():
    return torch.from_numpy(SyntheticDetection(1, 96, seed=3).render(0, masks=False)[0]).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("op,fast,factor", [
    (F.adjust_brightness, augment.adjust_brightness, 1.3), (F.adjust_contrast, augment.adjust_contrast, 0.6),
    (F.adjust_contrast, augment.adjust_contrast, 1.4), (F.adjust_saturation, augment.adjust_saturation, 0.6),
    (F.adjust_saturation, augment.adjust_saturation, 1.4), (F.adjust_hue, augment.adjust_hue, 0.08),
    (F.adjust_hue, augment.adjust_hue, -0.1)])
def test_each_jitter_kernel_matches_torchvision(image, op, fast, factor):
    want = op(image, factor).float()
    got = augment.to_chw(fast(augment.to_hwc(image), factor)).float()
    diff = (got - want).abs()
    assert diff.mean() < 1.0 and torch.quantile(diff.flatten(), 0.99) <= 4, (diff.mean(), diff.max())


def test_grayscale_blur_solarize_match_torchvision(image):
    x = augment.to_hwc(image)
    for want, got in [(F.rgb_to_grayscale(image, 3), augment.grayscale(x)),
                      (F.gaussian_blur(image, [23, 23], [1.7, 1.7]), augment.gaussian_blur(x, 23, 1.7)),
                      (F.solarize(image, 128), augment.solarize(x, 128))]:
        diff = (augment.to_chw(got).float() - want.float()).abs()
        assert diff.max() <= 1, diff.max()


def test_color_augment_draws_as_torchvision_does(image):
    """Same seed -> the same coin flips and factors as the v2 pipeline: the RNG ends in the same state."""
    fast = augment.ColorAugment((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 11, (0.1, 2.0), 0.5, 0.2)
    slow = v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                       v2.RandomApply([v2.GaussianBlur(11, (0.1, 2.0))], p=0.5), v2.RandomSolarize(128, p=0.2)])
    diffs = []
    for seed in range(30):
        torch.manual_seed(seed)
        a = fast(image).float()
        after_fast = torch.rand(1)
        torch.manual_seed(seed)
        b = slow(image).float()
        assert torch.rand(1) == after_fast
        diffs.append((a - b).abs().mean())
    assert max(diffs) < 3, max(diffs)  # torchvision truncates after each op (about -0.5 a step), we round


def _soco_pair(view=96, v3=48, n=12):
    import soco

    args = soco.get_args_parser().parse_args(["--view-size", str(view), "--v3-size", str(v3), "--proposals-kind", "random"])
    source = SyntheticDetection(n, 128, mode="unlabeled", seed=1)
    return (SeededDataset(soco.SoCoViews(source, None, args), 5),
            SeededDataset(ref.ReferenceSoCoViews(source, None, args), 5))


def test_soco_views_match_the_old_pipeline():
    new, old = _soco_pair()
    stats = {"new": [], "old": []}
    for i in range(len(new)):
        (vn, bn), (vo, bo) = new[i], old[i]
        for a, b, ba, bb in zip(vn, vo, bn, bo):
            assert torch.equal(ba["boxes"], bb["boxes"])  # same draws: same crops, flips and proposals
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            grey = ((a - b) * STD).abs() * 255  # grey levels
            assert grey.mean() < 3, (i, grey.mean())
            stats["new"].append(torch.cat([(a * STD + MEAN).mean((1, 2)), (a * STD + MEAN).std((1, 2))]))
            stats["old"].append(torch.cat([(b * STD + MEAN).mean((1, 2)), (b * STD + MEAN).std((1, 2))]))
    # in distribution: per-channel means and contrasts over every view agree within 2 grey levels
    # (torchvision truncates after each jitter op, about -0.5 level a step; OpenCV rounds)
    assert (torch.stack(stats["new"]).mean(0) - torch.stack(stats["old"]).mean(0)).abs().max() < 2 / 255


def test_ssod_strong_view_matches_the_old_pipeline():
    import ssod_certainty as ssod

    args = ssod.parse_args([])
    scenes = SyntheticDetection(8, 96, seed=2)
    weak = detection_transforms(True, [112], 160)
    new = SeededDataset(ssod.SemiSupervisedSet(scenes, scenes, weak, ssod.strong_augmentation(args)), 3)
    old = SeededDataset(ref.ReferenceSemiSupervisedSet(scenes, scenes, weak, ref.reference_strong_augmentation(args)), 3)
    means = {"new": [], "old": []}
    for i in range(8, 16):  # the unlabelled half: strong view + weak view
        (sn, tn), (so, to) = new[i], old[i]
        assert torch.equal(tn["weak_image"], to["weak_image"])
        assert sn.shape == so.shape and sn.dtype == so.dtype == torch.float32
        grey = (sn - so).abs() * 255
        assert grey.mean() < 3, (i, grey.mean())  # the cutout noise is drawn identically, so it cancels
        means["new"].append(sn.clamp(0, 1).mean((1, 2)))
        means["old"].append(so.clamp(0, 1).mean((1, 2)))
    assert (torch.stack(means["new"]).mean(0) - torch.stack(means["old"]).mean(0)).abs().max() < 2 / 255


@pytest.mark.parametrize("flags", [["--no-color-jitter"], ["--no-blur"], ["--no-color-jitter", "--no-blur"]])
def test_ssod_ablation_switches_draw_as_before(flags):
    import ssod_certainty as ssod

    args = ssod.parse_args(flags)
    x = torch.rand(3, 40, 56).mul(255).round().div(255)
    torch.manual_seed(0)
    a = ssod.strong_augmentation(args)(x)
    after = torch.rand(1)
    torch.manual_seed(0)
    b = ref.reference_strong_augmentation(args)(x)
    assert torch.rand(1) == after
    assert ((a - b).abs() * 255).mean() < 3


def test_dap_cam_inputs_match_the_old_collate():
    import dap

    r = SyntheticDetection(3, 120, mode="object", seed=4)
    imgs = [torch.from_numpy(r.render(i, masks=False)[0]).permute(2, 0, 1) for i in range(3)]
    imgs[1] = imgs[1][:, :, 20:100]  # portrait, 120 x 80
    batch = [(i, (img, i % 2)) for i, img in enumerate(imgs)]
    new, old = dap.CamInputs([48, 96])(batch), ref.ReferenceCamInputs([48, 96])(batch)
    for (xn, gn), (xo, go) in zip(new[0], old[0]):
        assert xn.shape == xo.shape and torch.equal(gn, go)
        grey = ((xn - xo) * STD).abs() * 255
        assert grey.mean() < 0.5 and grey.max() <= 1.5, (grey.mean(), grey.max())
    for a, b in zip(new[1:], old[1:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stored_crops", [True, False])
def test_jigsaw_assembly_matches_the_old_one(tmp_path, stored_crops):
    import jigsaw

    scenes = SyntheticDetection(12, 128, seed=6)
    jigsaw.extract_samples(scenes, tmp_path / "samples", seed=0)
    if not stored_crops:  # a table extracted before crops were stored: cut from the source images
        for f in jigsaw.CROP_FILES:
            (tmp_path / "samples" / f).unlink()
    table = jigsaw.load_sample_table(tmp_path / "samples")
    assert ("crops" in table) == stored_crops
    template = jigsaw.Template(128, 32)
    new = SeededDataset(jigsaw.JigsawAssembly(scenes, table, template), 1)
    old = SeededDataset(ref.ReferenceJigsawAssembly(scenes, table, template), 1)
    for i in range(8):
        (xn, tn), (xo, to) = new[i], old[i]
        assert torch.equal(tn["region_labels"], to["region_labels"]) and xn.shape == xo.shape == (3, 128, 128)
        grey = ((xn - xo) * STD).abs() * 255
        assert grey.mean() < (2.0 if stored_crops else 0.5), (i, grey.mean())  # JPEG q95 / uint8 rounding


def test_jigsaw_crops_are_the_samples_pixels(tmp_path):
    import jigsaw

    scenes = SyntheticDetection(4, 96, seed=7)
    jigsaw.extract_samples(scenes, tmp_path / "samples", seed=0)
    table = jigsaw.load_sample_table(tmp_path / "samples")
    ds = jigsaw.JigsawAssembly(scenes, table, jigsaw.Template(64, 32))
    assert len(table["crop_offsets"]) == len(table["labels"]) + 1
    for k in range(len(table["labels"])):
        image = scenes[int(table["image_index"][k])][0]
        x1, y1, x2, y2 = jigsaw.crop_box(table["boxes"][k], image.shape[-2:])
        crop = ds.crop(k)
        assert crop.dtype == torch.uint8 and crop.shape == (3, y2 - y1, x2 - x1)
        assert (crop.float() - image[:, y1:y2, x1:x2].float()).abs().mean() < 4  # JPEG q95 on sharp synthetic edges
