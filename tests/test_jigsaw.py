"""jigsaw.py: sample extraction, assembly layout, Eq. 1-2, the losses, and smoke runs of every stage
(pre-training with resume, fine-tuning, scratch, ERF figure, benchmark, 2-process torchrun)."""
import json
import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import jigsaw
from common.synthetic import SyntheticDetection

from conftest import record_autocast, run_torchrun


# --- Sec. 3.1: sample selection -------------------------------------------------------------------
def test_enlarged_boxes_grow_up_to_twice_and_are_truncated():
    rng = np.random.default_rng(0)
    gt = np.array([[40, 40, 60, 70]] * 2000, np.float32)  # 20 x 30 box in a 100 x 100 image
    big = jigsaw.enlarge_boxes(gt, (100, 100), rng)
    w, h = big[:, 2] - big[:, 0], big[:, 3] - big[:, 1]
    assert (big[:, :2] <= gt[:, :2]).all() and (big[:, 2:] >= gt[:, 2:]).all()  # corners move outwards
    assert w.min() >= 20 and w.max() <= 40 and h.min() >= 30 and h.max() <= 60
    assert w.max() > 38 and h.max() > 57  # the full range is used
    edge = jigsaw.enlarge_boxes(np.array([[0, 2, 90, 99]] * 200, np.float32), (100, 100), rng)
    assert edge.min() >= 0 and edge[:, 2].max() <= 100 and edge[:, 3].max() <= 100  # truncated at the image
    assert (edge[:, 3] == 100).mean() > 0.9


def test_negatives_never_overlap_ground_truth():
    rng = np.random.default_rng(1)
    gt = np.array([[10, 10, 50, 50], [60, 20, 90, 80]], np.float32)
    neg = jigsaw.random_negatives(gt, (100, 120), 50, rng)
    assert len(neg) > 10
    assert (box_iou(torch.from_numpy(neg), torch.from_numpy(gt)) == 0).all()
    assert (neg[:, 2] <= 120).all() and (neg[:, 3] <= 100).all() and (neg[:, :2] >= 0).all()


def test_sample_table_positives_negatives_and_memmap(tmp_path):
    ds = SyntheticDetection(40, 96, seed=3)
    jigsaw.extract_samples(ds, tmp_path / "samples", seed=0)
    table = jigsaw.load_sample_table(tmp_path / "samples")
    assert isinstance(table["boxes"], np.memmap) and table["boxes"].dtype == np.float32
    C = len(ds.classes)
    n_gt = sum(len(ds.annotations(i)["boxes"]) for i in range(len(ds)))
    pos, neg = (table["labels"] < C).sum(), (table["labels"] == C).sum()
    assert pos == n_gt and table["meta"]["classes"][-1] == "background"
    assert neg + table["meta"]["negatives_not_found"] == int(n_gt * 0.1)  # 10 : 1
    for k in np.nonzero(table["labels"] == C)[0]:
        gt = ds.annotations(int(table["image_index"][k]))["boxes"]
        assert box_iou(torch.from_numpy(table["boxes"][k:k + 1].copy()), torch.from_numpy(gt)).max() == 0
    for k in np.nonzero(table["labels"] < C)[0][:50]:  # each positive contains its ground-truth box
        ann = ds.annotations(int(table["image_index"][k]))
        inside = ((table["boxes"][k, :2] <= ann["boxes"][:, :2] + 1e-4).all(1)
                  & (table["boxes"][k, 2:] >= ann["boxes"][:, 2:] - 1e-4).all(1))
        assert inside.any() and table["labels"][k] + 1 in ann["labels"][inside]


def test_negatives_are_exclusive_with_the_positive_samples(tmp_path):
    # Sec. 3.1: "IoU(pos, neg) = 0 ... negative samples are exclusive with those positive ones": the
    # positives are the enlarged crops, so a negative may touch no enlarged box of its image.
    ds = SyntheticDetection(48, 64, seed=0)
    jigsaw.extract_samples(ds, tmp_path / "samples", seed=0)
    table = jigsaw.load_sample_table(tmp_path / "samples")
    C = len(ds.classes)
    boxes, labels, index = (np.array(table[k]) for k in ("boxes", "labels", "image_index"))
    negatives = np.nonzero(labels == C)[0]
    assert len(negatives) >= 5
    for k in negatives:
        pos = boxes[(index == index[k]) & (labels < C)]
        assert box_iou(torch.from_numpy(boxes[k:k + 1]), torch.from_numpy(pos)).max() == 0, k


# --- Sec. 3.2: assembly -------------------------------------------------------------------------
def test_template_regions_and_feature_positions():
    t = jigsaw.Template(224, 64)
    masks = t.input_masks()
    assert (masks.sum(0) == 1).all()  # a partition
    assert [int(m.sum()) for m in masks] == [64 * 64, 160 * 64, 64 * 160, 160 * 160]
    ar = [(x2 - x1) / (y2 - y1) for x1, y1, x2, y2 in t.boxes]
    assert 0.5 <= ar[0] <= 1.5 and ar[1] > 1.5 and ar[2] < 0.5 and 0.5 <= ar[3] <= 1.5
    rop = t.region_of_position().view(7, 7)
    assert (rop[:2, :2] == 0).all() and (rop[:2, 2:] == 1).all() and (rop[2:, :2] == 2).all() and (rop[2:, 2:] == 3).all()
    with pytest.raises(ValueError, match="multiples of the stride"):
        jigsaw.Template(224, 50)


class _Solid:
    """A detection source whose image k is filled with the value k (so crops are identifiable)."""
    classes = ("a", "b", "c")

    def __getitem__(self, k):
        return torch.full((3, 200, 200), k, dtype=torch.uint8), {}


def _table(boxes, labels):
    n = len(boxes)
    return {"image_index": np.arange(n), "boxes": np.asarray(boxes, np.float32), "labels": np.asarray(labels),
            "meta": {"classes": ["a", "b", "c", "background"]}}


def test_assembly_places_each_group_in_its_region():
    # sample k comes from image k: 0 small S, 1 large S, 2 wide W, 3 tall T
    boxes = [[0, 0, 20, 20], [0, 0, 150, 140], [0, 0, 180, 30], [0, 0, 30, 180]]
    ds = jigsaw.JigsawAssembly(_Solid(), _table(boxes, [0, 1, 2, 3]), jigsaw.Template(224, 64), "warp")
    assert {g: v.tolist() for g, v in ds.groups.items()} == {"S": [0, 1], "T": [3], "W": [2]}
    torch.manual_seed(0)
    for _ in range(5):
        image, target = ds[0]
        assert image.shape == (3, 224, 224)
        assert target["region_labels"].tolist() == [0, 2, 3, 1]  # R1 small S, R2 W, R3 T, R4 large S
        raw = image * torch.tensor(jigsaw.STD)[:, None, None] + torch.tensor(jigsaw.MEAN)[:, None, None]
        raw = (raw * 255).round()
        for k, (x1, y1, x2, y2) in zip([0, 2, 3, 1], ds.template.boxes):
            assert (raw[:, y1:y2, x1:x2] == k).all()  # warp fills the whole region with sample k


def test_epoch_draw_counts_follow_the_group_sizes():
    # 40 S, 4 T, 4 W samples: an epoch (12 images) draws each T / W sample 3 times, each S sample 0.6 times
    boxes = [[0, 0, 20, 20]] * 40 + [[0, 0, 10, 40]] * 4 + [[0, 0, 40, 10]] * 4
    ds = jigsaw.JigsawAssembly(_Solid(), _table(boxes, [0] * 48), jigsaw.Template(224, 64))
    expected = ds.draws_per_epoch()
    assert len(ds) == 12 and expected == pytest.approx({"S": 0.6, "T": 3.0, "W": 3.0})
    torch.manual_seed(0)
    counts = np.zeros(48)
    epochs = 200
    for _ in range(epochs * len(ds)):
        np.add.at(counts, ds.choose(), 1)
    for g, idx in ds.groups.items():
        assert counts[idx].mean() / epochs == pytest.approx(expected[g], rel=0.05), g
    assert "about once only when the groups are balanced" in jigsaw.JigsawAssembly.__doc__


def test_padcrop_pads_small_and_crops_large_samples():
    torch.manual_seed(0)
    small = jigsaw.fit_to_region(torch.ones(3, 10, 20), (64, 64), "padcrop", 1.0, False)
    assert small.shape == (3, 64, 64) and small.sum() == 3 * 10 * 20  # padded with zeros, nothing lost
    large = jigsaw.fit_to_region(torch.rand(3, 300, 100) + 0.1, (64, 160), "padcrop", 1.0, True)
    filled = (large > 0).all(0).all(0)  # (160,) columns holding the sample
    assert large.shape == (3, 64, 160) and filled.sum() == 100  # rows cropped to 64, columns padded
    assert (large[:, :, ~filled] == 0).all() and filled.nonzero().flatten().diff().eq(1).all()
    resized = jigsaw.fit_to_region(torch.ones(3, 100, 50), (64, 64), "resize", 1.0, False)
    assert resized.sum() == 3 * 64 * 32  # aspect kept: 64 x 32, then padded
    scaled = jigsaw.fit_to_region(torch.ones(3, 20, 20), (64, 64), "padcrop", 1.5, False)
    assert scaled.sum() == 3 * 30 * 30  # per-sample resize ratio (Sec. 4.1)


# --- Sec. 3.3: Eq. 1-2 and the losses ---------------------------------------------------------------
def test_erf_label_weights_hand_computed():
    masks = torch.zeros(4, 2, 2, dtype=torch.bool)  # a 2 x 2 input, one pixel per region
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, 0] = masks[3, 1, 1] = True
    erf = torch.tensor([[[6.0, 2.0], [1.0, 1.0]],  # position in R1: own share 0.6 < tau
                        [[1.0, 8.0], [0.0, 1.0]],  # position in R2: own share 0.8 > tau
                        [[0.0, 0.0], [5.0, 0.0]],  # ERF only inside its own region (R3)
                        [[0.0, 0.0], [0.0, 0.0]]])  # dead ERF, position in R4
    w = jigsaw.erf_label_weights(erf, masks, torch.tensor([0, 1, 2, 3]), tau=0.7)
    expected = torch.tensor([[0.7, 0.3 * 2 / 4, 0.3 * 1 / 4, 0.3 * 1 / 4],
                             [0.2 * 1 / 2, 0.8, 0.0, 0.2 * 1 / 2],
                             [0.0, 0.0, 1.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(w, expected, atol=1e-6)


def test_erf_label_weights_rows_sum_to_one_and_tau_one_is_blockwise():
    t = jigsaw.Template(128, 32)
    rop = t.region_of_position()
    erf = torch.rand(len(rop), 128, 128)
    for tau in (0.0, 0.5, 0.7):
        w = jigsaw.erf_label_weights(erf, t.input_masks(), rop, tau)
        assert torch.allclose(w.sum(1), torch.ones(len(rop)), atol=1e-5)
        assert (w.gather(1, rop[:, None]) >= tau - 1e-6).all() and (w >= 0).all()
    w1 = jigsaw.erf_label_weights(erf, t.input_masks(), rop, tau=1.0)
    assert torch.equal(w1, torch.nn.functional.one_hot(rop, 4).float())
    labels = torch.tensor([[2, 0, 1, 3]])
    y = jigsaw.soft_labels(w1, labels, 5, t.feature_hw)  # Eq. 1 with tau = 1: each region's own label
    assert torch.equal(y.argmax(1).flatten(), labels[0][rop]) and torch.equal(y.sum(1), torch.ones(1, 4, 4))


def test_erf_adaptive_loss_averages_per_region_then_regions():
    rop = torch.tensor([0, 1, 1, 1, 2, 2, 3, 3, 3])  # uneven region sizes
    logits = torch.randn(2, 5, 3, 3)
    targets = torch.softmax(torch.randn(2, 5, 3, 3), 1)
    loss_map = -(targets * torch.log_softmax(logits, 1)).sum(1).flatten(1)
    expected = torch.stack([loss_map[:, rop == r].mean(1) for r in range(4)], 1).mean()
    assert torch.allclose(jigsaw.erf_adaptive_loss(logits, targets, rop), expected)


def test_effective_receptive_fields_match_single_position_gradients():
    from common.detectors import build_classifier

    torch.manual_seed(0)
    net = build_classifier("resnet18", 3).eval()
    images = torch.randn(2, 3, 64, 64)
    erf = jigsaw.effective_receptive_fields(net, images, chunk=3)  # chunks that split the 4 positions
    assert erf.shape == (4, 64, 64) and (erf >= 0).all()
    ref = torch.zeros(64, 64)
    for img in images:
        x = img[None].clone().requires_grad_(True)
        jigsaw.backbone_features(net, x)[0, :, 1, 0].sum().backward()  # position (j=1, k=0) = p 2
        ref += x.grad.abs().sum((0, 1))
    assert torch.allclose(erf[2], ref / 2, rtol=1e-4, atol=1e-7)


# --- smoke runs of every stage -------------------------------------------------------------------
SMALL = ["--data", "synthetic", "--num-images", "24", "--image-size", "64", "--backbone", "resnet18",
         "--input-size", "64", "--split", "32", "--batch-size", "4", "--warmup-iters", "2", "--erf-every", "1",
         "--erf-images", "1", "--workers", "0", "--device", "cpu", "--log-every", "1",
         "--train-split", "train", "--val-split", "val"]
DET = ["--arch", "faster_rcnn_fpn", "--det-epochs", "1", "--det-steps", "1", "--det-batch-size", "4",
       "--min-size", "64", "--max-size", "64", "--det-warmup-iters", "1",
       "--det-kwargs", json.dumps({"anchor_sizes": [16, 32, 64, 128, 256], "rpn_batch_size_per_image": 32,
                                   "box_batch_size_per_image": 32})]


def _args(out, *extra):
    return jigsaw.get_args_parser().parse_args(SMALL + ["--out", str(out), *extra])


def test_pretrain_resume_matches_uninterrupted_run(tmp_path):
    full = jigsaw.pretrain(_args(tmp_path / "a", "--iters", "4"), _env())
    jigsaw.pretrain(_args(tmp_path / "b", "--iters", "4", "--checkpoint-every", "1"), _env(), max_steps=3)
    resumed = jigsaw.pretrain(_args(tmp_path / "b", "--iters", "4", "--resume", "auto"), _env())
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["extra"]["erf"]["weights"], b["extra"]["erf"]["weights"])
    w = a["extra"]["erf"]["weights"]
    assert w.shape == (4, 4) and torch.allclose(w.sum(1), torch.ones(4))


def test_pretrain_compute_is_recorded_per_rank_and_carried_across_resume(tmp_path):
    # Tab. 5's cost: recorded as the pre-training runs, in the checkpoint (every rank) and compute.json
    args = _args(tmp_path, "--iters", "4", "--checkpoint-every", "1")
    path = jigsaw.pretrain(args, _env(), max_steps=3)
    state = torch.load(path, weights_only=True)
    per_rank = state["extra"]["compute"]["per_rank_s"]
    assert len(per_rank) == 1 and per_rank[0] > 0
    state["extra"]["compute"]["per_rank_s"] = [1000.0]  # as if the first 3 steps had cost 1000 s
    torch.save(state, path)
    jigsaw.pretrain(_args(tmp_path, "--iters", "4", "--resume", "auto"), _env())
    record = json.loads((path.parent / "compute.json").read_text())
    assert record["world_size"] == 1 and 1000 < record["total_s"] < 1000 + 600  # carried on, plus step 4
    assert record["iterations"] == 4


def test_scratch_gets_exactly_the_jigsaw_runs_recorded_compute(tmp_path):
    env = _env()
    det = [*DET, "--num-images", "8"]
    jigsaw.pretrain(_args(tmp_path, "--iters", "2"), env)
    tuned = jigsaw.finetune(_args(tmp_path, *det), env)
    budget = sum(json.loads((tmp_path / d / "compute.json").read_text())["total_s"] for d in ("pretrain", "finetune"))
    assert tuned["train_compute_s"] == json.loads((tmp_path / "finetune" / "compute.json").read_text())["total_s"]
    scratch = jigsaw.finetune(_args(tmp_path, *det, "--calibrate-iters", "2"), env, scratch=True)  # --scratch-budget-s auto
    schedule = json.loads((tmp_path / "scratch" / "schedule.json").read_text())
    assert schedule["budget_s"] == pytest.approx(budget)
    assert schedule["iterations"] == max(1, round(budget / schedule["seconds_per_iteration"]))
    assert scratch["iterations"] == schedule["iterations"] and scratch["budget_s"] == pytest.approx(budget)
    assert scratch["train_compute_s"] > 0  # the scratch run's own compute, reported beside its budget
    with pytest.raises(FileNotFoundError, match="--scratch-budget-s"):
        jigsaw.finetune(_args(tmp_path / "other", *det), env, scratch=True)


def test_amp_pretrain_and_finetune_steps_on_the_cpu(tmp_path, monkeypatch):
    dtypes = record_autocast(monkeypatch, jigsaw.engine)
    path = jigsaw.pretrain(_args(tmp_path, "--iters", "1", "--amp", "--resume", "auto"), _env())  # nothing to resume
    jigsaw.finetune(_args(tmp_path, *DET, "--amp", "--num-images", "4"), _env())  # 1 epoch of 1 step
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # --amp on the CPU: bfloat16 autocast
    assert torch.load(path, weights_only=True)["step"] == 1
    log = json.loads((path.parent / "metrics.jsonl").read_text())
    assert math.isfinite(log["loss"])


@pytest.mark.parametrize("strategy", ["blockwise", "global"])
def test_other_strategies_train(tmp_path, strategy):
    path = jigsaw.pretrain(_args(tmp_path, "--iters", "2", "--strategy", strategy, "--fit", "resize"), _env())
    assert path.parent.name == f"pretrain_{strategy}" and torch.load(path, weights_only=True)["step"] == 2


def test_demo_writes_table5_and_table2_into_demo_json(tmp_path, monkeypatch, capsys):
    tiny = dict(jigsaw.DEMO, train_scenes=16, val_scenes=4, input_size=64, split=32, pretrain_batch=2,
                pretrain_steps=8, finetune_steps=8, calibrate_steps=(8, 9))
    monkeypatch.setattr(jigsaw, "DEMO", tiny)
    monkeypatch.setitem(jigsaw_demo_recipe()["detector"], "batch_size", 2)  # a fast test
    out = tmp_path / "demo"
    jigsaw.main(jigsaw.get_args_parser().parse_args(["--demo", "--seed", "3", "--out", str(out),
                                                     "--demo-strategies", "blockwise"]))
    printed = capsys.readouterr().out
    assert "loaded 100 tensors: backbone.body.*" in printed  # the Jigsaw backbone went into the detector
    result = json.loads((out / "demo.json").read_text())
    assert result["script"] == "jigsaw.py" and result["seed"] == 3
    (c,) = result["claims"]
    assert c["claim"] == "Jigsaw + fine-tune > scratch (GN) at equal compute" and c["metric"] == "AP50"
    t5, t2 = result["tables"]["table5"], result["tables"]["table2"]
    assert c["better"]["value"] == t5["jigsaw_erf"]["AP50"] and c["worse"]["value"] == t5["scratch_gn"]["AP50"]
    assert t5["scratch_gn"]["budget_s"] == pytest.approx(t5["jigsaw_erf"]["pretrain_s"] + t5["jigsaw_erf"]["finetune_s"])
    # scratch trains until its own compute reaches the budget (not for steps planned from a calibration)
    assert t5["scratch_gn"]["planned_steps"] == max(8, round(t5["scratch_gn"]["budget_s"] / t5["scratch_gn"]["seconds_per_step"]))
    assert t5["scratch_gn"]["steps"] >= 1 and t5["scratch_gn"]["total_s"] >= t5["scratch_gn"]["budget_s"]
    assert set(t2) == {"ERF-adaptive Dense Cls.", "Block-wise Cls."}  # erf always, then --demo-strategies
    assert all(0 <= row["AP50"] <= 1 for row in t2.values())
    with pytest.raises(FileExistsError, match="another --out"):  # a demo never writes into an old folder
        jigsaw.main(jigsaw.get_args_parser().parse_args(["--demo", "--seed", "3", "--out", str(out)]))


def jigsaw_demo_recipe():
    from common.demo import DEMO_RECIPE

    return DEMO_RECIPE


def test_benchmark_reports_pipeline_and_model_rates(tmp_path):
    bench = jigsaw.benchmark(_args(tmp_path), _env(), batches=2)
    assert bench["pipeline_images_per_s"] > 0 and bench["model_images_per_s"] > 0


def test_cli_defaults_are_the_papers():
    a = jigsaw.get_args_parser().parse_args([])
    assert (a.stage, a.strategy, a.tau, a.erf_every, a.fit) == ("pretrain", "erf", 0.7, 5000, "padcrop")
    assert (a.iters, a.batch_size, a.lr, a.warmup_iters, a.warmup_lr) == (64000, 512, 0.8, 1250, 0.2)
    assert (a.weight_decay, a.momentum, a.neg_ratio, a.max_enlarge, tuple(a.scale_range)) == (1e-4, 0.9, 0.1, 2.0, (0.8, 1.5))
    assert (a.det_epochs, tuple(a.det_steps), a.det_batch_size, a.det_lr) == (13, (9, 12), 16, 0.02)
    assert (a.min_size, a.max_size, a.backbone) == (800, 1333, "resnet50")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --stage extract"):
        jigsaw.load_sample_table(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        jigsaw.pretrain(_args(tmp_path, "--iters", "2", "--resume", str(tmp_path / "nope.pth")), _env())
    with pytest.raises(ValueError, match="--scratch-budget-s must be 'auto' or a number"):
        jigsaw.scratch_budget(_args(tmp_path, "--scratch-budget-s", "ten"))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        jigsaw.finetune(_args(tmp_path, *DET, "--weights", str(tmp_path / "missing.pth")), _env())


def test_torchrun_two_processes(tmp_path):
    run_torchrun(["jigsaw.py", "--stage", "pretrain", *SMALL, "--out", tmp_path, "--iters", "2"], nproc=2)
    state = torch.load(tmp_path / "pretrain" / "checkpoint.pth", weights_only=True)
    assert state["step"] == 2 and state["extra"]["erf"]["weights"].shape == (4, 4)


def _env():
    from common.distributed import init_distributed

    return init_distributed("cpu")
