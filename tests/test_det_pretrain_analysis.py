"""det_pretrain_analysis.py: the contract functions against brute force, the probe and the AP curve,
a smoke run of every experiment, a 2-process torchrun of detection fine-tuning, and bad inputs."""
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import det_pretrain_analysis as dpa
from common.detectors import build_classifier, build_detector
from common.data import detection_transforms
from common.distributed import init_distributed
from conftest import record_autocast, run_torchrun


# --------------------------------------------------------------------------------------------
# comembership
# --------------------------------------------------------------------------------------------
def _brute_comembership(a, b):
    same_a = same_b = both = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        sa, sb = a[i] == a[j], b[i] == b[j]
        same_a += sa
        same_b += sb
        both += sa and sb
    return (both / same_a if same_a else math.nan, both / same_b if same_b else math.nan)


@pytest.mark.parametrize("seed", range(6))
def test_comembership_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    a, b = rng.integers(0, int(rng.integers(1, 8)), n), rng.integers(0, int(rng.integers(1, 8)), n) * 7 - 3
    assert dpa.comembership(a, b) == pytest.approx(_brute_comembership(a, b), nan_ok=True)


def test_comembership_identical_and_relabelled_clusterings():
    a = np.array([0, 0, 1, 1, 1, 2, 5, 5])
    assert dpa.comembership(a, a) == (1.0, 1.0)
    assert dpa.comembership(a, 10 - a) == (1.0, 1.0)  # the same partition under other names


def test_comembership_nested_clusterings_are_asymmetric():
    fine = np.array([0, 0, 1, 1, 2, 2])
    coarse = np.array([0, 0, 0, 0, 1, 1])
    p_coarse_given_fine, p_fine_given_coarse = dpa.comembership(fine, coarse)
    assert p_coarse_given_fine == 1.0  # together in the fine one -> together in the coarse one
    assert p_fine_given_coarse == pytest.approx(3 / 7)  # 7 coarse pairs, 3 of them fine pairs


def test_comembership_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="different images"):
        dpa.comembership([0, 1, 1], [0, 1])


# --------------------------------------------------------------------------------------------
# mask_out_map
# --------------------------------------------------------------------------------------------
class RegionModel(nn.Module):
    """Logit of class 0 = 10 * (mean of channel 0 over rows 10-19, cols 30-39) - 5; class 1: 0."""

    def forward(self, x):
        m = x[:, 0, 10:20, 30:40].mean((1, 2))
        return torch.stack([10 * m - 5, torch.zeros_like(m)], 1)


def _brute_mask_out(model, image, target, patch, stride):
    _, H, W = image.shape
    out = torch.zeros(len(range(0, H, stride)), len(range(0, W, stride)))
    for r, cy in enumerate(range(0, H, stride)):
        for c, cx in enumerate(range(0, W, stride)):
            x = image.clone()
            y0, x0 = cy - patch // 2, cx - patch // 2
            x[:, max(0, y0):max(0, y0 + patch), max(0, x0):max(0, x0 + patch)] = 0
            out[r, c] = model(x[None]).softmax(1)[0, target]
    return out


@pytest.mark.parametrize("patch,stride", [(8, 1), (12, 3), (60, 7)])
def test_mask_out_map_on_a_model_of_one_region(patch, stride):
    model, image = RegionModel(), torch.ones(3, 32, 48)
    m = dpa.mask_out_map(model, image, 0, patch=patch, stride=stride, batch_size=17)
    assert m.shape == (math.ceil(32 / stride), math.ceil(48 / stride))
    torch.testing.assert_close(m, _brute_mask_out(model, image, 0, patch, stride))
    high, low = torch.sigmoid(torch.tensor(5.0)), torch.sigmoid(torch.tensor(-5.0))
    assert torch.isclose(m.max(), high)  # a patch away from the region changes nothing
    if patch >= 10:
        assert torch.isclose(m.min(), low)  # a patch over the whole region removes the evidence
    # a patch centred far from the region (top-left corner) leaves it whole
    assert torch.isclose(m[0, 0], high) or patch == 60


def test_mask_out_map_exact_positions():
    model, image = RegionModel(), torch.ones(3, 32, 48)
    m = dpa.mask_out_map(model, image, 0, patch=10, stride=1)
    # the region is rows 10..19, cols 30..39: centred at (15, 35) a 10x10 patch covers it exactly
    assert torch.isclose(m[15, 35], torch.sigmoid(torch.tensor(-5.0)))
    # centred at (4, 35) the patch spans rows -1..8: no overlap
    assert torch.isclose(m[4, 35], torch.sigmoid(torch.tensor(5.0)))


# --------------------------------------------------------------------------------------------
# linear probe, AP curve, cluster grid, category removal
# --------------------------------------------------------------------------------------------
def test_linear_probe_on_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 5, (4, 16))
    y = rng.integers(0, 4, 400)
    x = centres[y] + rng.normal(0, 0.5, (400, 16))
    acc, linear = dpa.linear_probe(x[:300], y[:300], x[300:], y[300:])
    assert acc > 0.97
    # the returned nn.Linear (standardisation folded in) predicts like the probe
    pred = linear(torch.as_tensor(x[300:], dtype=torch.float32)).argmax(1).numpy()
    assert (pred == y[300:]).mean() > 0.97


def test_linear_probe_binary_gives_two_logits():
    x = np.r_[np.zeros((20, 3)), np.ones((20, 3))] + np.random.default_rng(1).normal(0, 0.1, (40, 3))
    y = np.r_[np.zeros(20, int), np.ones(20, int)]
    acc, linear = dpa.linear_probe(x, y, x, y)
    assert acc == 1.0 and linear.out_features == 2
    assert (linear(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).all()


def test_linear_probe_class_missing_from_training():
    x = np.r_[np.zeros((10, 2)), np.ones((10, 2)) * 5]
    y = np.r_[np.zeros(10, int), np.full(10, 3)]
    acc, linear = dpa.linear_probe(x, y, x, y, num_classes=5)
    assert acc == 1.0 and linear.out_features == 5
    assert (linear(torch.as_tensor(x, dtype=torch.float32)).argmax(1).numpy() == y).all()


def test_ap_vs_iou_is_non_increasing():
    rng = np.random.default_rng(0)
    preds, tgts = [], []
    for _ in range(12):
        gt = rng.uniform(0, 60, (4, 2))
        gt = np.c_[gt, gt + rng.uniform(10, 40, (4, 2))]
        labels = rng.integers(1, 4, 4)
        det = np.repeat(gt, 3, 0) + rng.normal(0, 4, (12, 4))
        tgts.append({"boxes": torch.tensor(gt, dtype=torch.float32), "labels": torch.tensor(labels)})
        preds.append({"boxes": torch.tensor(det, dtype=torch.float32), "labels": torch.tensor(np.repeat(labels, 3)),
                      "scores": torch.tensor(rng.uniform(0, 1, 12), dtype=torch.float32)})
    curve = dpa.ap_vs_iou(preds, tgts, [0.1 * i for i in range(1, 10)])
    maps = [curve[t]["mAP"] for t in sorted(curve)]
    assert maps[0] > 0.5 and maps[-1] < maps[0]
    assert all(b <= a + 1e-12 for a, b in zip(maps, maps[1:]))


def test_cluster_counts_grid():
    ks = dpa.cluster_counts(5000, 1000, 12)
    assert ks[0] == 2 and ks[-1] == 1000 and 4 in ks and ks == sorted(set(ks))
    assert dpa.cluster_counts(10, 1000, 12)[-1] == 5  # at most n / 2 clusters


def test_without_categories_drops_every_image_holding_them():
    from common.synthetic import SyntheticDetection

    ds = SyntheticDetection(30, 64, seed=3)
    keep = dpa.without_categories(ds, ["star", "triangle"])
    star, tri = ds.classes.index("star") + 1, ds.classes.index("triangle") + 1
    for i in range(len(ds)):
        present = set(ds.annotations(i)["labels"].tolist())
        assert (i in keep) == (not present & {star, tri})
    with pytest.raises(ValueError, match="not classes"):
        dpa.without_categories(ds, ["zebra"])


# --------------------------------------------------------------------------------------------
# networks: parsing, loading, bad inputs
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    cls = d / "cls.pth"
    torch.save({"model": build_classifier("resnet18", 8).state_dict(), "args": {}}, cls)
    det = d / "det.pth"
    torch.save({"model": build_detector("faster_rcnn_fpn", 8, backbone="resnet18").state_dict()}, det)
    return cls, det


def test_parse_net():
    assert dpa.parse_net("a=x/y.pth") == ("a", "x/y.pth", "auto")
    assert dpa.parse_net("a=x/y.pth:det") == ("a", "x/y.pth", "det")
    with pytest.raises(ValueError, match="NAME=PATH"):
        dpa.parse_net("x/y.pth")


def test_load_net_kinds_and_shared_backbone(nets):
    cls, det = nets
    a, b = dpa.load_net(f"a={cls}", "resnet18"), dpa.load_net(f"b={det}", "resnet18")
    assert (a.kind, b.kind) == ("cls", "det") and a.detector is None and b.detector is not None
    assert set(a.backbone) == set(b.backbone) and not any(k.startswith("fc.") for k in a.backbone)
    assert dpa.head_detector(b, "resnet18", 64) is not None and dpa.head_detector(a, "resnet18", 64) is None


def test_load_net_bad_inputs(nets, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        dpa.load_net(f"a={tmp_path / 'missing.pth'}", "resnet18")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load"):
        dpa.load_net(f"a={bad}", "resnet18")
    with pytest.raises(ValueError, match="--backbone"):
        dpa.load_net(f"a={nets[0]}", "resnet50")


def test_detection_head_features_shapes(nets):
    det = dpa.head_detector(dpa.load_net(f"b={nets[1]}", "resnet18"), "resnet18", 64)
    f = dpa.detection_head_features(det, torch.rand(2, 3, 64, 64))
    dims = {"Conv5 (avg)": 512, "ConvProj (256,14,14)": 256 * 14 * 14, "ConvProj (256,4,4)": 256 * 16,
            "ConvProj (256,2,2)": 256 * 4, "ConvProj (256)": 256, "FC1 (1024)": 1024, "FC2 (1024)": 1024}
    assert {k: tuple(v.shape) for k, v in f.items()} == {k: (2, d) for k, d in dims.items()}


# --------------------------------------------------------------------------------------------
# smoke run of every experiment, and torchrun
# --------------------------------------------------------------------------------------------
TINY = ["--backbone", "resnet18", "--device", "cpu", "--workers", "0", "--synthetic-size", "64",
        "--synthetic-train", "16", "--synthetic-test", "12", "--synthetic-pretrain", "24",
        "--det-scales", "64", "--det-max-size", "64", "--det-test-size", "64",
        "--anchor-sizes", "8", "16", "32", "64", "128", "--box-batch-per-image", "16", "--test-proposals", "20",
        "--det-epochs", "1", "--det-lr-steps", "1", "--det-batch-size", "4", "--det-warmup", "2",
        "--cls-epochs", "1", "--cls-batch-size", "8", "--cls-size", "64",
        "--kmeans-max", "6", "--kmeans-points", "3", "--pairs", "2", "--mask-patch", "20", "--mask-stride", "16",
        "--vis-images", "2", "--pretrain-steps", "2", "--pretrain-batch-size", "4", "--pretrain-norm", "bn"]


@pytest.fixture(scope="module")
def smoke(nets, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cls, det = nets
    args = dpa.get_args_parser().parse_args(TINY + ["--net", f"cls={cls}", "--net", f"det={det}", "--out", str(out),
                                                    "--remove-categories", "star"])
    return out, dpa.main(args)


def test_smoke_detection(smoke):
    out, res = smoke
    for name in ("cls", "det"):
        m = res["detection"][name]["mAP"]
        assert set(m) >= {f"{0.1 * i:.1f}".rstrip("0") for i in range(1, 10)} and all(0 <= v <= 1 for v in m.values())
    assert (out / "fig1_ap_vs_iou.png").is_file()


def test_smoke_classification_and_probes(smoke):
    _, res = smoke
    for exp in ("classification", "probes"):
        assert set(res[exp]) == {"cls", "det"} and all(0 <= r["top1"] <= 1 for r in res[exp].values())
    assert set(res["head-probes"]) == {"det"} and set(res["head-probes"]["det"]) == set(dpa.HEAD_FEATURES)


def test_smoke_features_and_visualisation(smoke):
    out, res = smoke
    curve = res["features"]["pairs"]["cls|det"]
    assert curve["k"] == res["features"]["cluster_counts"]
    for name in ("fig6_comembership.png", "fig7_tsne.png", "fig3_pairs_cls_vs_det.png",
                 "fig4_activation_maps.png", "fig5_mask_out.png"):
        assert (out / name).is_file(), name
    assert all(0 <= r["min"] <= r["mean"] <= 1 for rows in res["visualisation"].values() for r in rows)


def test_smoke_removal_and_report(smoke):
    out, res = smoke
    rows = res["removal"]["AP@0.7"]
    assert set(rows) == {"cls (image labels)", "det", "det w/o star"}  # pre-trained alike, in this run
    assert all(set(r) == {"star", "mean"} for r in rows.values())
    assert set(res["removal"]["table7"]) == {"cls (image labels)", "det"}
    assert all(set(r) == {"mAP@0.5", "mAP@0.7", "top1"} for r in res["removal"]["table7"].values())
    report = json.loads((out / "report.json").read_text())
    assert set(report["results"]) == set(dpa.EXPERIMENTS)
    md = (out / "report.md").read_text()
    for table in ("Table 1", "Table 2", "Table 5", "Table 6", "Table 7", "Table 8", "Fig. 6"):
        assert table in md


def test_main_needs_two_networks(nets):
    with pytest.raises(SystemExit, match="two or more"):
        dpa.main(dpa.get_args_parser().parse_args(["--net", f"a={nets[0]}"]))


def test_torchrun_detection_finetuning_and_sharded_analyses(nets, smoke, tmp_path, root):
    """2 ranks (gloo): DDP fine-tuning, then the analyses after the process group is gone, each rank
    doing its share (issue 18: on 8 GPUs rank 0 alone ran them while the others waited in a
    collective past NCCL's watchdog); the numbers are those of the single-process run."""
    cls, det = nets
    run_torchrun([root / "det_pretrain_analysis.py", *TINY, "--net", f"cls={cls}", "--net", f"det={det}",
                  "--experiments", "detection", "probes", "features", "visualisation", "--out", tmp_path])
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["results"]["detection"]) == {"cls", "det"}
    assert (tmp_path / "detection" / dpa.load_net(f"det={det}", "resnet18").key / "checkpoint.pth").is_file()
    shares = [torch.load(tmp_path / "ranks" / f"{phase}.rank{r}.pt", weights_only=True)
              for phase in ("fit", "mask") for r in (0, 1)]
    assert all(shares) and not set(shares[0]) & set(shares[1])  # both ranks worked, on different units
    single = smoke[1]
    for name in ("cls", "det"):
        assert report["results"]["probes"][name]["top1"] == pytest.approx(single["probes"][name]["top1"], abs=0.1)
        for got, want in zip(report["results"]["visualisation"][name], single["visualisation"][name]):
            assert got["image"] == want["image"] and got["mean"] == pytest.approx(want["mean"], abs=1e-3)
    assert report["results"]["features"]["cluster_counts"] == single["features"]["cluster_counts"]


def test_amp_pretraining_step_on_the_cpu_and_resume_paths(tmp_path, monkeypatch):
    env = init_distributed("cpu")
    args = dpa.get_args_parser().parse_args(TINY + ["--pretrain-steps", "1", "--amp", "--out", str(tmp_path),
                                                    "--resume", "auto"])  # nothing to resume yet: fresh
    data = dpa.det_dataset(args, args.pretrain_split, args.pretrain_data,
                           detection_transforms(True, args.det_scales, args.det_max_size))
    dtypes = record_autocast(monkeypatch, dpa)
    ckpt = dpa.pretrain_detector(args, env, data, tmp_path / "pretrain", 1)
    assert dtypes == [torch.bfloat16]  # --amp on the CPU: bfloat16 autocast
    assert torch.load(ckpt, weights_only=True)["step"] == 1
    args.resume = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        dpa.pretrain_detector(args, env, data, tmp_path / "other", 1)
    args.resume = str(tmp_path.parent / "elsewhere" / "checkpoint.pth")  # a checkpoint of another run
    (tmp_path.parent / "elsewhere").mkdir(exist_ok=True)
    torch.save({}, args.resume)
    with pytest.raises(ValueError, match="several trainings"):
        dpa.pretrain_detector(args, env, data, tmp_path / "other", 1)


def test_closest_and_close_but_distant_pairs():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(30, 5))
    dist = dpa.cosine_distances(f)
    i, j = np.triu_indices(30, 1)
    brute = sorted(zip(dist[i, j], i, j))[:5]
    assert [p[:2] for p in dpa.closest_pairs(dist, 5)] == [(int(a), int(b)) for _, a, b in brute]
    close_a, far_b = rng.integers(0, 6, 30), rng.integers(0, 2, 30)
    want = sorted((dist[a, b], a, b) for a, b in zip(i, j) if close_a[a] == close_a[b] and far_b[a] != far_b[b])[:4]
    got = dpa.close_but_distant_pairs(dist, close_a, far_b, 4)
    assert [p[:2] for p in got] == [(int(a), int(b)) for _, a, b in want]


def test_load_net_reads_any_torchvision_weights(torchvision_hub):
    from torchvision.models import ResNet18_Weights

    net = dpa.load_net("tv=torchvision:cls", "resnet18")
    assert torchvision_hub == [ResNet18_Weights.IMAGENET1K_V1] and net.kind == "cls"
    assert (net.backbone["conv1.weight"] == 0.25).all()
    with pytest.raises(ValueError, match="has no weights 'IMAGENET1K_V2'"):  # parsed as torchvision's, not a path
        dpa.load_net("tv=torchvision:IMAGENET1K_V2", "resnet18")


def test_demo_writes_both_claims(tmp_path, monkeypatch):
    """The demo end to end at a toy budget: demo.json with the issue's two claims and the AP curve."""
    monkeypatch.setattr(dpa, "DEMO", {"objects": 16, "classifier_steps": 8, "pretrain_scenes": 16, "pretrain_steps": 8,
                                      "finetune_scenes": 8, "finetune_steps": 8, "test_scenes": 6, "probe_train": 24,
                                      "probe_test": 16, "kmeans": (2, 4)})
    monkeypatch.chdir(tmp_path)  # the render cache goes under runs/
    dpa.main(dpa.get_args_parser().parse_args(["--demo", "--seed", "3", "--out", str(tmp_path / "demo")]))
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert result["seed"] == 3 and [c["metric"] for c in result["claims"]] == ["AP@0.8", "probe top-1"]
    assert [(c["better"]["name"], c["worse"]["name"]) for c in result["claims"]] == [("det", "cls"), ("cls", "det")]
    assert set(result["tables"]["fig1_mAP_at_IoU"]["det"]) == {f"{0.1 * i:.1f}" for i in range(1, 10)}
    with pytest.raises(SystemExit, match="not empty"):  # a finished demo is never overwritten by accident
        dpa.main(dpa.get_args_parser().parse_args(["--demo", "--seed", "3", "--out", str(tmp_path / "demo")]))


# --------------------------------------------------------------------------------------------
# issue 18: 8 GPUs, Tab. 2 across datasets and controlled, probes once in float32, SNIPER's VOC
# metric, results keyed by the weights
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_rank_share_does_every_analysis_unit_once(world):
    units = dpa.analysis_units(dpa.EXPERIMENTS, {"a": None, "b": None, "c": None})
    assert len(units) == 12 and len(set(units)) == 12  # probe, head-probes, kmeans, tsne per network
    shares = [dpa.rank_share(units, r, world) for r in range(world)]
    assert sorted(u for s in shares for u in s) == sorted(units)  # each unit on exactly one rank
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_exchange_merges_every_rank_and_waits_for_late_ones(tmp_path):
    import threading

    ex = [dpa.Exchange(tmp_path, r, 2) for r in range(2)]
    ex[0].put("fit", {"a": torch.ones(2)})
    late = threading.Timer(0.3, ex[1].put, ("fit", {"b": 1.5}))
    late.start()
    merged = ex[0].gather("fit", poll_s=0.05)  # returns only once rank 1's file is there
    late.join()
    assert set(merged) == {"a", "b"} and merged["b"] == 1.5


def test_removal_categories_across_coco_and_voc():
    voc = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
           "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
    coco = ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "dog", "couch", "tv")
    pre, down = dpa.removal_categories(["car", "bus", "truck"], coco, voc)  # the documented command: VOC has no truck
    assert pre == ["car", "bus", "truck"] and down == ["bus", "car"]
    pre, down = dpa.removal_categories(["vehicle"], coco, voc)
    assert pre == ["bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"]
    assert down == ["aeroplane", "bicycle", "boat", "bus", "car", "motorbike", "train"]
    assert dpa.removal_categories(["aeroplane", "sofa"], coco, voc) == (["airplane", "couch"], ["aeroplane", "sofa"])
    with pytest.raises(ValueError, match="zebra"):
        dpa.removal_categories(["zebra"], coco, voc)
    with pytest.raises(ValueError, match="none is a class of the fine-tuning set"):
        dpa.removal_categories(["truck"], coco, voc)


def test_image_label_is_the_largest_box():
    ann = {"boxes": np.array([[0, 0, 4, 4], [0, 0, 10, 3], [5, 5, 6, 6]], np.float32), "labels": np.array([3, 7, 1])}
    assert dpa.image_label(ann) == 6  # 0-based class of the 10 x 3 box


def test_sniper_uses_the_07_metric_before_2010(tmp_path):
    for year in ("2007", "2008", "2012"):
        (tmp_path / f"VOC{year}" / "Annotations").mkdir(parents=True)
    assert dpa.sniper_07_metric(str(tmp_path / "VOC2007")) and dpa.sniper_07_metric(str(tmp_path / "VOC2008"))
    assert not dpa.sniper_07_metric(str(tmp_path / "VOC2012")) and not dpa.sniper_07_metric("synthetic")
    assert dpa.sniper_07_metric(f"{tmp_path / 'VOC2008'},{tmp_path / 'VOC2012'}")


def test_linear_probe_fits_in_float32(monkeypatch):
    from sklearn.linear_model import LogisticRegression

    seen, fit = [], LogisticRegression.fit
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, x, y: seen.append(x.dtype) or fit(self, x, y))
    rng = np.random.default_rng(0)
    dpa.linear_probe(rng.normal(size=(40, 6)), np.arange(40) % 3, rng.normal(size=(9, 6)), np.arange(9) % 3)
    assert seen == [np.float32]  # float64 doubled the memory of a 50,176-dim ConvProj probe


def test_results_are_keyed_by_the_weights(nets, smoke, tmp_path):
    cls, det = nets
    a, again = dpa.load_net(f"x={cls}", "resnet18"), dpa.load_net(f"x={cls}", "resnet18")
    sd = torch.load(cls, weights_only=True)
    sd["model"]["conv1.weight"][0, 0, 0, 0] += 1
    torch.save(sd, tmp_path / "changed.pth")
    changed = dpa.load_net(f"x={tmp_path / 'changed.pth'}", "resnet18")
    assert a.key == again.key and a.key != changed.key and a.key.startswith("x-")
    out, _ = smoke
    assert (out / "detection" / dpa.load_net(f"cls={cls}", "resnet18").key / "result.json").is_file()


def test_controlled_removal_pretrains_alike(smoke):
    out, res = smoke
    steps = {p.parent.name: torch.load(p, weights_only=True)["step"] for p in (out / "removal").glob("*/*/checkpoint.pth")}
    assert steps == {"cls": res["removal"]["iterations"], "det": res["removal"]["iterations"],
                     "det_without": res["removal"]["iterations"]}
