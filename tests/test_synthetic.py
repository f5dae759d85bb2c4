"""common.synthetic (the generator's invariants, the "hard" rendering kept bit-identical, the render
cache) and common.demo (the demo.json schema, a short learning check at the demo recipe)."""
import hashlib
import json
import math
import pickle

import numpy as np
import pytest
import torch

from common.demo import (build_demo_detector, check_demo_result, claim, evaluate_demo_classifier,
                         train_demo_classifier, write_demo_result)
from common.detectors import build_classifier
from common.synthetic import CONTRAST_FLOOR, SHAPES, RenderCache, SyntheticDetection, _dilate


def test_every_mode_is_deterministic_per_seed():
    for mode in ("scenes", "object", "unlabeled"):
        a, b, c = (SyntheticDetection(4, 64, mode=mode, seed=s) for s in (1, 1, 2))
        for i in range(4):
            (ia, ta), (ib, tb) = a.render(i), b.render(i)
            assert np.array_equal(ia, ib) and np.array_equal(ta["boxes"], tb["boxes"])
        assert not np.array_equal(a.render(0)[0], c.render(0)[0])
    assert not np.array_equal(SyntheticDetection(1, 64, seed=1).render(0)[0],
                              SyntheticDetection(1, 64, seed=1, difficulty="hard").render(0)[0])


def test_hard_rendering_is_the_original_bit_for_bit():
    # digest of the images and boxes that the original generator (commit 25e8339) rendered
    h = hashlib.sha256()
    for mode in ("scenes", "object", "unlabeled"):
        d = SyntheticDetection(3, 64, mode=mode, seed=5, difficulty="hard")
        for i in range(3):
            image, ann = d.render(i)
            h.update(image.tobytes())
            h.update(ann["boxes"].tobytes())
    assert h.hexdigest() == "6dfcfec2ae14223d7bf8a4c676937664a4d65fd2a7b7249995c66c19e6869331"


def _objects(ds):
    for i in range(len(ds)):
        image, ann = ds.render(i)
        for k, (box, mask) in enumerate(zip(ann["boxes"], ann["masks"])):
            yield image, ann, k, box, mask


def test_easy_scenes_boxes_masks_sizes_and_aspects():
    size = 64
    ds = SyntheticDetection(60, size, seed=0)
    sides, aspects, counts = [], [], []
    for i in range(len(ds)):
        _, ann = ds.render(i)
        counts.append(len(ann["labels"]))
        assert not (ann["masks"].sum(0) > 1).any()  # visible masks never overlap
        assert ((ann["labels"] >= 1) & (ann["labels"] <= len(SHAPES))).all()
        for box, mask in zip(ann["boxes"], ann["masks"]):
            ys, xs = np.nonzero(mask)  # the box is tight on the visible pixels
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            w, h = box[2] - box[0], box[3] - box[1]
            sides.append(math.sqrt(w * h)), aspects.append(w / h)
    sides, aspects = np.array(sides), np.array(aspects)
    assert min(counts) >= 2 and max(counts) > min(counts)
    # most objects at least the smallest demo anchor (16 px at 64 px); occluded ones may be smaller
    assert np.median(sides) >= 16 and (sides >= 10).mean() > 0.9
    # Jigsaw's tall (< 0.5) and wide (> 1.5) groups both fill
    assert (aspects < 0.5).mean() > 0.05 and (aspects > 1.5).mean() > 0.1 and aspects.min() > 0.2 and aspects.max() < 5


def test_easy_objects_clear_the_contrast_floor():
    """Every object's mean colour differs from the background around it, and from each object
    it covers, by at least CONTRAST_FLOOR (largest RGB difference of the means)."""
    ds = SyntheticDetection(40, 64, seed=3)
    checked = 0
    for i in range(len(ds)):
        image, ann = ds.render(i)
        img = image.astype(np.float32) / 255
        occupied = ann["masks"].any(0)
        for k, mask in enumerate(ann["masks"]):
            if mask.sum() < 20:
                continue
            colour = img[mask].mean(0)
            ring = _dilate(mask, 2) & ~occupied  # background pixels next to the object
            if ring.sum() >= 10:
                assert np.abs(colour - img[ring].mean(0)).max() >= CONTRAST_FLOOR, (i, k)
                checked += 1
            for j, other in enumerate(ann["masks"]):  # an object it touches
                border = _dilate(mask, 1) & other
                if j != k and border.sum() >= 10 and other.sum() >= 20:
                    assert np.abs(colour - img[other].mean(0)).max() >= CONTRAST_FLOOR * 0.8, (i, k, j)
    assert checked > 100


def test_object_mode_is_object_centric():
    ds = SyntheticDetection(80, 64, mode="object", seed=0)
    box_areas, pixel_areas, labels = [], [], []
    for i in range(len(ds)):
        ann = ds.annotations(i, masks=True)
        assert len(set(ann["labels"].tolist())) == 1  # one class per image
        b = ann["boxes"]
        box_areas.append((b[:, 2].max() - b[:, 0].min()) * (b[:, 3].max() - b[:, 1].min()) / 64 ** 2)
        pixel_areas.append(ann["masks"].any(0).mean())
        labels.append(int(ann["labels"][0]))
    # the labelled object dominates the image (the hard rendering's median pixel share is 0.15)
    assert np.median(box_areas) > 0.35 and np.percentile(box_areas, 10) > 0.25 and np.median(pixel_areas) > 0.2
    assert len(set(labels)) == len(SHAPES)


def test_render_cache_written_once_identical_and_pickle_light(tmp_path):
    plain = SyntheticDetection(12, 64, seed=7)
    cached = SyntheticDetection(12, 64, seed=7, cache=tmp_path)
    folders = [p for p in tmp_path.iterdir()]
    assert len(folders) == 1 and (folders[0] / "key.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    mtime = (folders[0] / "images.npy").stat().st_mtime_ns
    again = SyntheticDetection(12, 64, seed=7, cache=tmp_path)  # opens, does not re-render
    assert (folders[0] / "images.npy").stat().st_mtime_ns == mtime
    for i in range(12):
        (a, ta), (b, tb) = plain[i], again[i]
        assert torch.equal(a, b) and torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["masks"], tb["masks"])
        assert np.array_equal(plain.annotations(i)["labels"], cached.annotations(i)["labels"])
    assert len(pickle.dumps(cached)) < 4000  # a worker gets the path, not the arrays
    clone = pickle.loads(pickle.dumps(cached))
    assert torch.equal(clone[3][0], plain[3][0])
    # another key (seed, size, count, difficulty) is another folder
    SyntheticDetection(12, 64, seed=8, cache=tmp_path)
    SyntheticDetection(12, 64, seed=7, cache=tmp_path, difficulty="hard")
    assert len([p for p in tmp_path.iterdir()]) == 3


def test_render_cache_refuses_an_unfinished_folder(tmp_path):
    ds = SyntheticDetection(3, 64, seed=1)
    cache = RenderCache.build(ds, tmp_path)
    (cache.path / "key.json").unlink()  # as if killed before the last file: not a cache
    (cache.path / "images.npy").write_bytes(b"garbage")
    with pytest.raises(OSError):
        RenderCache.build(ds, tmp_path)  # the folder is there but incomplete: refuse to reuse or overwrite it


def test_demo_result_schema(tmp_path):
    c = [claim("DAP > CLS at 5-shot", "AP50", ("DAP", 0.31), ("CLS", 0.22))]
    path = write_demo_result(tmp_path, "dap.py", 3, 12.34, c, {"table": {"DAP": 0.31}})
    obj = json.loads(path.read_text())
    assert obj["script"] == "dap.py" and obj["seed"] == 3 and obj["claims"][0]["better"] == {"name": "DAP", "value": 0.31}
    for broken in ({**obj, "claims": []}, {**obj, "seed": "3"},
                   {**obj, "claims": [{**c[0], "worse": {"name": "CLS", "value": float("nan")}}]}):
        with pytest.raises(ValueError, match="demo.json"):
            check_demo_result(broken)
    with pytest.raises(ValueError):
        write_demo_result(tmp_path / "bad", "dap.py", 3, 1.0, [], {})
    assert not (tmp_path / "bad" / "demo.json").exists()


def test_demo_detector_keeps_torchvision_names_and_loads_a_classifier():
    classifier = build_classifier("resnet18", len(SHAPES), norm="bn")
    model = build_demo_detector(len(SHAPES), pretrained=classifier.state_dict())
    sd = model.state_dict()
    assert torch.equal(sd["backbone.body.layer1.0.conv1.weight"], classifier.state_dict()["layer1.0.conv1.weight"])
    assert sd["roi_heads.box_predictor.cls_score.weight"].shape == (len(SHAPES) + 1, 256)


def test_classifier_learns_far_above_chance_in_a_few_steps(tmp_path):
    torch.manual_seed(0)
    train = SyntheticDetection(600, 64, mode="object", seed=1, cache=tmp_path).classification()
    test = SyntheticDetection(200, 64, mode="object", seed=2, cache=tmp_path).classification()
    model = build_classifier("resnet18", len(SHAPES), norm="bn")
    train_demo_classifier(model, train, steps=120, seed=0, log=None)
    assert evaluate_demo_classifier(model, test) > 0.35  # chance is 0.125


def test_run_seeds_writes_the_mean_std_table_into_the_results_file(tmp_path):
    from common.demo import SEEDS_BEGIN, run_seeds

    script = tmp_path / "fake.py"  # a demo that writes demo.json like every script's --demo
    script.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom common.demo import claim, write_demo_result\n"
        "a = sys.argv; seed = int(a[a.index('--seed') + 1]); out = a[a.index('--out') + 1]\n"
        "write_demo_result(out, 'fake.py', seed, 60.0 * (seed + 1), [claim('A > B', 'AP50', ('A', 0.5 + seed / 10), ('B', 0.25))], {})\n"
        % str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    results = tmp_path / "results"
    results.mkdir()
    (results / "fake.md").write_text("# fake\n\nkept text\n")
    run_seeds(str(script), [0, 2], tmp_path / "runs", results_dir=results)
    text = (results / "fake.md").read_text()
    assert "kept text" in text and SEEDS_BEGIN in text
    assert "A 0.6000 ± 0.1414" in text and "B 0.2500 ± 0.0000" in text and "2 of 2 seeds" in text
    run_seeds(str(script), [1], tmp_path / "runs", results_dir=results)  # replaces the block, keeps the rest
    text = (results / "fake.md").read_text()
    assert text.count(SEEDS_BEGIN) == 1 and "A 0.6000 ± 0.0000" in text and "kept text" in text


@pytest.mark.parametrize("total,warmup", [(1, 1), (2, 0), (3, 1), (4, 1), (8, 2), (400, 100)])
def test_one_cycle_runs_at_any_length(total, warmup):
    """common.demo.one_cycle: OneCycleLR divided by zero when a phase had under 2 steps (3 steps,
    warm-up 1); now every length runs, the LR stays positive and ends lower than it peaks."""
    from common.demo import one_cycle

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = one_cycle(opt, total, warmup)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert all(lr > 0 for lr in lrs) and max(lrs) == pytest.approx(1.0, rel=1e-6)
    if total >= 4:
        assert lrs[-1] < 0.5 * max(lrs) and lrs[0] < max(lrs)


def test_one_cycle_factor_is_one_cycles_curve():
    """common.demo.one_cycle_factor (the LR of a run measured in compute) follows the scheduler's
    curve: 1/25 of the peak at the start, the peak at the end of the warm-up, 1/25,000 at the end."""
    from common.demo import one_cycle, one_cycle_factor

    total, warmup = 400, 100
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = one_cycle(opt, total, warmup)
    for step in range(total):
        assert one_cycle_factor(step / (total - 1), warmup / total) == pytest.approx(
            opt.param_groups[0]["lr"], abs=0.01)
        opt.step()
        sched.step()
    assert one_cycle_factor(0.0, 0.25) == pytest.approx(0.04) and one_cycle_factor(0.25, 0.25) == 1.0
    assert one_cycle_factor(1.0, 0.25) == pytest.approx(4e-5) and one_cycle_factor(2.0, 0.25) == pytest.approx(4e-5)


def test_training_on_a_compute_budget_stops_at_the_budget(monkeypatch):
    """common.demo._train_steps with budget_s: the run stops at the step that would start past the
    budget (here each step costs 1 s of a fake clock: a budget of 7 s is 7 steps, whatever the
    planned 100), and the LR rises then falls over the budget, not over the planned steps."""
    import common.demo as cd

    optimizers, real = [], cd.demo_optimizer  # the real optimizer, kept where the test can read its LR
    monkeypatch.setattr(cd, "demo_optimizer", lambda *a, **k: optimizers.append(real(*a, **k)) or optimizers[-1])
    model, clock, lrs = torch.nn.Linear(2, 1), [0.0], []

    def loss_of(step, idx):
        clock[0] += 1.0
        lrs.append(optimizers[0].param_groups[0]["lr"])
        return model(torch.ones(len(idx), 2)).pow(2).mean()

    wall, steps = cd._train_steps(model, "detector", loss_of, 10, 2, 100, 2, 0, None, budget_s=7.0,
                                  clock=lambda: clock[0])
    peak = cd.DEMO_RECIPE["detector"]["lr"]
    assert steps == 7 and len(lrs) == 7 and clock[0] == 7.0
    assert lrs[0] == pytest.approx(peak / 25) and max(lrs) > 0.9 * peak and lrs[-1] < 0.2 * peak
    with pytest.raises(ValueError, match="budget_s must be a positive"):  # no silent zero-step baseline
        cd._train_steps(model, "detector", loss_of, 10, 2, 100, 2, 0, None, budget_s=0.0)


def test_imagenet_standin_trains_once_and_reads_back(tmp_path):
    """common.demo.imagenet_standin: the demo classifier's weights, written under cache/backbones/
    and read back by a second call (same tensors, cached=True, the first run's wall time); the
    weights load into the demo detector's backbone; without a cache nothing is written."""
    from common.demo import imagenet_standin

    first = imagenet_standin(0, steps=2, images=40, cache=tmp_path, log=None)
    assert not first["cached"] and first["path"].startswith(str(tmp_path / "backbones"))
    again = imagenet_standin(0, steps=2, images=40, cache=tmp_path, log=None)
    assert again["cached"] and again["wall_s"] == first["wall_s"]
    assert all(torch.equal(first["state_dict"][k], again["state_dict"][k]) for k in first["state_dict"])
    detector = build_demo_detector(len(SHAPES), pretrained=first["state_dict"])
    assert torch.equal(detector.backbone.body.conv1.weight, first["state_dict"]["conv1.weight"])
    other_seed = imagenet_standin(1, steps=2, images=40, cache=None, log=None)
    assert other_seed["path"] is None and not torch.equal(other_seed["state_dict"]["conv1.weight"],
                                                          first["state_dict"]["conv1.weight"])
