"""dap.py: Eq. 1-6 on constructed CAMs, CAM extraction, the pseudo-box table and its reader, every
subcommand's smoke run, resume after interruption, the demo at toy scale, 2-process torchrun."""
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools.coco import COCO

import dap
from common.data import build_classification_dataset
from common.demo import check_demo_result
from common.synthetic import SyntheticDetection
from common.detectors import build_classifier
from common.distributed import init_distributed, seed_everything

from conftest import record_autocast, run_torchrun

# toy settings shared by the smoke runs: 64-px object images, ResNet-18, a few iterations
DATA = ["--image-size", "64", "--synthetic-images", "24", "--device", "cpu", "--workers", "0", "--seed", "0"]
DET = ["--backbone", "resnet18", "--batch-size", "4", "--lr-batch", "4", "--lr", "0.01", "--warmup-iters", "1",
       "--scales", "64", "--max-size", "64", "--test-size", "64", "--anchor-sizes", "16", "32", "64", "128", "256",
       "--proposals", "64", "32", "--roi-batch", "32"]


def parse(*argv):
    return dap.get_args_parser().parse_args([str(a) for a in argv])


# --- Step 2, Eq. 1-6: constructed CAMs ------------------------------------------------------------
def test_uniform_rectangle_returns_that_rectangle():
    cam = torch.zeros(24, 32)
    cam[4:16, 6:26] = 5.0  # rows 4..15, columns 6..25: the rectangle [6, 26) x [4, 16)
    boxes = dap.cam_to_boxes(cam)
    assert boxes.shape == (1, 4) and boxes.dtype == torch.float32
    # sqrt(12 var) of n uniform cells is sqrt(n^2 - 1): within 0.05 of the side for n >= 12
    assert torch.allclose(boxes[0], torch.tensor([6.0, 4.0, 26.0, 16.0]), atol=0.05)


def test_two_separated_blobs_give_two_boxes():
    cam = torch.zeros(30, 40)
    cam[2:10, 3:13] = 1.0
    cam[16:26, 24:34] = 0.9  # same class, a similar size: Fig. 2's two kites
    boxes = dap.cam_to_boxes(cam)
    assert len(boxes) == 2
    boxes = boxes[boxes[:, 0].argsort()]
    assert torch.allclose(boxes, torch.tensor([[3.0, 2.0, 13.0, 10.0], [24.0, 16.0, 34.0, 26.0]]), atol=0.1)


def test_component_under_half_the_largest_is_dropped():
    cam = torch.zeros(30, 40)
    cam[2:5, 2:5] = 1.0  # 9 cells, the peak
    cam[12:24, 15:30] = 0.8  # 180 cells
    boxes = dap.cam_to_boxes(cam)
    assert len(boxes) == 1 and boxes[0, 0] > 14


@pytest.mark.parametrize("value", [0.0, 3.0, -2.0])
def test_all_equal_and_all_zero_maps_give_no_box_and_no_nan(value):
    for cam in (torch.full((7, 9), value), torch.full((1, 1), value)):
        boxes = dap.cam_to_boxes(cam)
        assert boxes.shape == (0, 4) and not torch.isnan(boxes).any()
    assert not torch.isnan(dap.normalize_cam(torch.full((2, 5, 5), value))).any()


def test_eq1_eq2_normalisation_and_strict_threshold():
    cam = torch.tensor([[[-1.0, 0.0], [1.0, 3.0]]])
    norm = dap.normalize_cam(cam)
    assert torch.allclose(norm, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    m = dap.threshold_cam(norm, torch.tensor([0.25, 0.5]))  # (T, B, h, w)
    assert torch.equal(m[0], torch.tensor([[[0.0, 0.0], [0.5, 1.0]]]))  # 0.25 is not > 0.25
    assert torch.equal(m[1], torch.tensor([[[0.0, 0.0], [0.0, 1.0]]]))


def test_moments_match_eq3_to_eq6_by_hand():
    m = np.array([1.0, 2.0, 1.0, 4.0])
    x = np.array([0.5, 1.5, 2.5, 0.5])
    y = np.array([0.5, 0.5, 0.5, 3.5])
    xc, yc, w, h = dap.moment_boxes(m, x, y, np.zeros(4, np.int64), 1)[0]
    s = m.sum()
    assert xc == pytest.approx((m * x).sum() / s) and yc == pytest.approx((m * y).sum() / s)
    assert w == pytest.approx(np.sqrt(12 * (m * (x - xc) ** 2).sum() / s))
    assert h == pytest.approx(np.sqrt(12 * (m * (y - yc) ** 2).sum() / s))


def test_batch_equals_one_map_at_a_time_and_padding_is_ignored():
    g = torch.Generator().manual_seed(0)
    cams = F.avg_pool2d(torch.rand(6, 1, 20, 24, generator=g), 5, 1, 2)[:, 0]  # smooth random maps
    boxes, image = dap.cams_to_boxes(cams)
    for i in range(len(cams)):
        assert torch.equal(boxes[image == i], dap.cam_to_boxes(cams[i]))
    padded = torch.full((1, 30, 30), 7.0)  # garbage outside the valid 20 x 24 cells
    padded[0, :20, :24] = cams[0]
    b2, _ = dap.cams_to_boxes(padded, sizes=torch.tensor([[20, 24]]))
    assert torch.allclose(b2, dap.cam_to_boxes(cams[0]))


def test_released_variant_keeps_at_most_four_components_per_threshold():
    cam = torch.zeros(40, 40)
    for k in range(6):  # six equal blobs
        cam[2 + 6 * k: 5 + 6 * k, 2 + 6 * k: 5 + 6 * k] = 1.0
    assert len(dap.cam_to_boxes(cam)) == 6
    rel = dap.cam_to_boxes(cam, variant="released")
    assert len(rel) == 4 and ((rel[:, 2:] - rel[:, :2]) >= 1).all()
    with pytest.raises(ValueError, match="variant"):
        dap.cam_to_boxes(cam, variant="other")


# --- CAM extraction ------------------------------------------------------------------------------
def test_cam_equals_a_manual_1x1_convolution():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 5).eval()
    x, labels = torch.randn(3, 3, 96, 64), torch.tensor([4, 0, 2])
    with torch.no_grad():
        feats = dap.resnet_features(model, x)
        manual_feats = torch.nn.Sequential(*list(model.children())[:-2])(x)
        cam = dap.class_activation_maps(feats, model.fc.weight, model.fc.bias, labels)
        conv = F.conv2d(feats, model.fc.weight[:, :, None, None], model.fc.bias)  # (B, K, h, w)
    assert torch.allclose(feats, manual_feats)
    assert cam.shape == (3, 3, 2)
    assert torch.allclose(cam, conv[torch.arange(3), labels], atol=1e-5)
    # without the average pooling: the CAM's mean is the class logit
    assert torch.allclose(cam.mean((1, 2)), model(x)[torch.arange(3), labels], atol=1e-4)


def test_multiscale_cam_is_normalised_on_the_largest_grid_and_flip_symmetric():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 8).eval()
    ds = SyntheticDetection(2, 64, mode="object").classification()
    per_scale, labels, _, sizes = dap.CamInputs([64, 128])([(i, ds[i]) for i in range(2)])
    assert [tuple(g[0].tolist()) for _, g in per_scale] == [(2, 2), (4, 4)]
    cams, grid = dap.multiscale_cams(model, per_scale, labels)
    assert cams.shape == (2, 4, 4) and cams.min() >= 0 and cams.max() <= 1 and grid.tolist() == [[4, 4], [4, 4]]
    mirrored = [(x.flip(-1), g) for x, g in per_scale]  # the flip average makes the CAM mirror-equivariant
    cams_m, _ = dap.multiscale_cams(model, mirrored, labels)
    assert torch.allclose(cams_m, cams.flip(-1), atol=1e-5)


# --- The pseudo-box table -----------------------------------------------------------------------
def _random_table(n_images, rng):
    counts = rng.integers(0, 4, n_images)
    m = int(counts.sum())
    xy = rng.uniform(0, 30, (m, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(2, 30, (m, 2))], 1).astype(np.float32)
    image_labels = rng.integers(0, 8, n_images)
    return counts, {"boxes": boxes, "labels": np.repeat(image_labels + 1, counts).astype(np.int64),
                    "image_ids": np.arange(n_images, dtype=np.int64), "image_labels": image_labels.astype(np.int64),
                    "sizes": np.full((n_images, 2), 64, np.int32)}


def test_table_writer_reader_round_trip_and_coco_export(tmp_path):
    rng = np.random.default_rng(0)
    counts, table = _random_table(10, rng)
    classes = list(SyntheticDetection.classes)
    dap.pseudo_box_table(tmp_path).write(counts, {"classes": classes}, **table)
    table["offsets"] = np.concatenate([[0], np.cumsum(counts)])
    written = dap.pseudo_box_table(tmp_path)
    arrays, meta = written.arrays, written.meta
    assert meta["num_images"] == 10 and meta["num_boxes"] == len(table["boxes"])
    for k, v in table.items():
        assert isinstance(arrays[k], np.memmap) and np.array_equal(arrays[k], v)
    images = SyntheticDetection(10, 64, mode="object").classification()
    ds = dap.PseudoBoxDataset(tmp_path, images, transforms=None)
    assert len(ds) == 10 and ds.classes == tuple(classes) and ds.image_size(3) == (64, 64)
    for k in range(10):
        image, target = ds[k]
        a, b = table["offsets"][k], table["offsets"][k + 1]
        assert image.shape == (3, 64, 64) and target["image_id"] == k
        assert np.array_equal(target["boxes"].numpy(), table["boxes"][a:b])
        assert np.array_equal(target["labels"].numpy(), table["labels"][a:b])
    ds[0]  # the maps are open now; pickling (to a worker) must not carry them
    assert ds.table._arrays is not None and pickle.loads(pickle.dumps(ds)).table._arrays is None
    assert len(pickle.dumps(ds)) < 20_000
    coco = COCO(str(dap.export_coco_json(tmp_path)))
    assert len(coco.getAnnIds()) == len(table["boxes"]) and len(coco.getImgIds()) == 10
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))
    assert np.allclose([a["bbox"][2] for a in ann], table["boxes"][: len(ann), 2] - table["boxes"][: len(ann), 0])


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="pseudo-boxes"):
        dap.pseudo_box_table(tmp_path / "missing").arrays
    counts, table = _random_table(4, np.random.default_rng(1))
    dap.pseudo_box_table(tmp_path).write(counts, {"classes": ["a"]}, **table)
    np.save(tmp_path / "offsets.npy", np.concatenate([[0], np.cumsum(counts)])[:-1])  # one image short
    with pytest.raises(ValueError, match="inconsistent"):
        dap.pseudo_box_table(tmp_path).arrays


def test_box_quality_corloc_and_recall():
    pred = [torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[50.0, 50, 60, 60]]), torch.zeros(0, 4)]
    true = [torch.tensor([[0.0, 0, 10, 12], [20, 20, 30, 30]]), torch.tensor([[0.0, 0, 10, 10]]),
            torch.tensor([[0.0, 0, 5, 5]])]
    q = dap.box_quality(pred, true)
    assert q["corloc"] == pytest.approx(1 / 3) and q["recall"] == pytest.approx(1 / 4)


# --- Every subcommand on the CPU -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Steps 1-3 once at toy scale: classifier, pseudo boxes (3 shards), detector."""
    out = tmp_path_factory.mktemp("dap")
    env = init_distributed("cpu")
    cls = dap.train_classifier(parse("classify", "--out", out / "cls", "--backbone", "resnet18", "--epochs", 1,
                                     "--batch-size", 8, "--lr", 0.1, "--crop-size", 64, *DATA), env)
    boxes = dap.generate_pseudo_boxes(parse("pseudo-boxes", "--out", out / "boxes", "--classifier", cls,
                                            "--scales", 64, 128, "--batch-size", 5, "--chunk-size", 10,
                                            "--coco-json", *DATA), env)
    det = dap.pretrain_detector(parse("pretrain", "--out", out / "det", "--pseudo-boxes", boxes, "--classifier", cls,
                                      "--epochs", 0.5, *DET, *DATA), env)
    return {"out": out, "cls": cls, "boxes": boxes, "det": det, "env": env}


def test_classify_writes_a_classifier_checkpoint(pipeline):
    ck = torch.load(pipeline["cls"], weights_only=True)
    assert ck["model"]["fc.weight"].shape == (8, 512) and ck["classes"] == list(SyntheticDetection.classes)
    assert "val_top1" in (pipeline["out"] / "cls" / "metrics.jsonl").read_text()


def test_pseudo_boxes_cover_every_image_with_valid_boxes(pipeline):
    table = dap.pseudo_box_table(pipeline["boxes"])
    arrays, meta = table.arrays, table.meta
    assert meta["num_images"] == 24 and sorted(arrays["image_ids"]) == list(range(24))
    assert len(list((pipeline["boxes"] / "shards").glob("chunk_*.npz"))) == 3
    b = np.asarray(arrays["boxes"])
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all() and b.min() >= 0 and b.max() <= 64
    ds = build_classification_dataset("synthetic", "train", num_images=24, image_size=64, seed=0).dataset
    assert np.array_equal(arrays["image_labels"], [ds.annotations(int(i))["labels"][0] - 1 for i in arrays["image_ids"]])
    counts = np.diff(arrays["offsets"])
    assert np.array_equal(arrays["labels"], np.repeat(arrays["image_labels"] + 1, counts))
    q = json.loads((pipeline["boxes"] / "quality.json").read_text())
    assert 0 <= q["corloc"] <= 1 and 0 <= q["recall"] <= 1
    assert (pipeline["boxes"] / "pseudo_boxes_coco.json").is_file()


def test_pseudo_box_generation_resumes_after_interruption(pipeline, tmp_path):
    env, cls = pipeline["env"], pipeline["cls"]
    args = parse("pseudo-boxes", "--out", tmp_path, "--classifier", cls, "--scales", 64, 128, "--batch-size", 5,
                 "--chunk-size", 10, *DATA)
    # an interrupted run: chunks 0 and 2 finished, chunk 1 died half-written, no table yet
    (tmp_path / "shards").mkdir()
    for c in (0, 2):
        src = pipeline["boxes"] / "shards" / f"chunk_{c:06d}.npz"
        (tmp_path / "shards" / src.name).write_bytes(src.read_bytes())
    (tmp_path / "shards" / ".chunk_000001.npz.tmp").write_bytes(b"half")
    before = {c: (tmp_path / "shards" / f"chunk_{c:06d}.npz").stat().st_mtime_ns for c in (0, 2)}
    dap.generate_pseudo_boxes(args, env)
    after = {c: (tmp_path / "shards" / f"chunk_{c:06d}.npz").stat().st_mtime_ns for c in (0, 2)}
    assert before == after  # finished shards were not recomputed
    a, b = dap.pseudo_box_table(tmp_path).arrays, dap.pseudo_box_table(pipeline["boxes"]).arrays
    for k in b:
        assert np.allclose(a[k], b[k], atol=1e-4), k


def test_pretrain_resumes_to_the_uninterrupted_weights(pipeline, tmp_path, monkeypatch):
    env = pipeline["env"]
    argv = ["pretrain", "--pseudo-boxes", pipeline["boxes"], "--classifier", pipeline["cls"], "--epochs", 1,
            *DET, *DATA]
    full = dap.pretrain_detector(parse(*argv, "--out", tmp_path / "full"), env)

    real = dap.train_detector

    def interrupted(*a, **kw):
        def stop(step):
            if step == 3:
                raise KeyboardInterrupt
        return real(*a, **dict(kw, checkpoint_every=1, on_step_end=stop))

    monkeypatch.setattr(dap, "train_detector", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dap.pretrain_detector(parse(*argv, "--out", tmp_path / "cut"), env)
    monkeypatch.setattr(dap, "train_detector", real)
    # killed during step 3, before its checkpoint: the resumed run redoes step 3
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["step"] == 2
    resumed = dap.pretrain_detector(parse(*argv, "--out", tmp_path / "cut", "--resume", "auto"), env)
    a, b = torch.load(full, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k


def test_amp_pretrain_step_and_pseudo_boxes_on_the_cpu(pipeline, tmp_path, monkeypatch):
    env = pipeline["env"]
    dtypes = record_autocast(monkeypatch, dap)
    dap.pretrain_detector(parse("pretrain", "--out", tmp_path / "det", "--pseudo-boxes", pipeline["boxes"],
                                "--classifier", pipeline["cls"], "--epochs", 0.2, "--amp", *DET, *DATA), env)
    assert dtypes == [torch.bfloat16]  # --amp on the CPU: bfloat16 autocast, one step
    log = json.loads((tmp_path / "det" / "metrics.jsonl").read_text())
    assert log["step"] == 1 and np.isfinite(log["loss"])
    boxes = dap.generate_pseudo_boxes(parse("pseudo-boxes", "--out", tmp_path / "boxes", "--classifier",
                                            pipeline["cls"], "--scales", 64, 128, "--batch-size", 24,
                                            "--chunk-size", 24, "--amp", *DATA), env)
    table = dap.pseudo_box_table(boxes)
    assert table.meta["num_images"] == 24 and np.isfinite(np.asarray(table.arrays["boxes"])).all()


def test_freeze_backbone_trains_only_fpn_rpn_and_heads(pipeline, tmp_path):
    det = dap.pretrain_detector(parse("pretrain", "--out", tmp_path, "--pseudo-boxes", pipeline["boxes"],
                                      "--classifier", pipeline["cls"], "--epochs", 0.5, "--freeze-backbone",
                                      *DET, *DATA), pipeline["env"])
    trained = torch.load(det, weights_only=True)["model"]
    cls = torch.load(pipeline["cls"], weights_only=True)["model"]
    assert torch.equal(trained["backbone.body.layer4.1.conv2.weight"], cls["layer4.1.conv2.weight"])
    seed_everything(0)  # the initial weights of that run
    start = dap.make_detector(parse("pretrain", "--out", tmp_path, "--pseudo-boxes", "x", "--classifier", "x", *DET),
                              8, pipeline["cls"]).state_dict()
    assert torch.equal(start["backbone.body.layer4.1.conv2.weight"], cls["layer4.1.conv2.weight"])
    assert not torch.equal(trained["backbone.fpn.layer_blocks.0.0.weight"], start["backbone.fpn.layer_blocks.0.0.weight"])
    assert not torch.equal(trained["rpn.head.conv.0.0.weight"], start["rpn.head.conv.0.0.weight"])


@pytest.mark.parametrize("init", ["det", "cls"])
def test_finetune_kshot_from_dap_and_from_cls(pipeline, tmp_path, init, capsys):
    m = dap.finetune_detector(parse("finetune", "--out", tmp_path, "--init", pipeline[init], "--kshot", 1,
                                    "--iters", 2, "--train-split", "train", "--test-split", "test",
                                    "--test-images", 6, *DET, *DATA), pipeline["env"])
    keys = ("AP", "AP50", "AP75", "voc_mAP50", "voc07_mAP50")
    assert all(0 <= m[k] <= 1 for k in keys)
    assert json.loads((tmp_path / "eval.json").read_text()) == m
    assert list(tmp_path.glob("kshot1_seed0.json"))
    printed = capsys.readouterr().out
    assert "loaded" in printed  # load_weights' report
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ck["step"] == 2


def test_torchrun_two_processes_pretrain_and_pseudo_boxes(pipeline, tmp_path):
    run_torchrun(["dap.py", "pseudo-boxes", "--out", tmp_path / "boxes", "--classifier", pipeline["cls"],
                  "--scales", 64, 128, "--batch-size", 5, "--chunk-size", 10, *DATA], nproc=2)
    a, b = dap.pseudo_box_table(tmp_path / "boxes").arrays, dap.pseudo_box_table(pipeline["boxes"]).arrays
    for k in b:  # the same table as one process wrote
        assert np.allclose(a[k], b[k], atol=1e-4), k
    run_torchrun(["dap.py", "pretrain", "--out", tmp_path / "det", "--pseudo-boxes", pipeline["boxes"],
                  "--classifier", pipeline["cls"], "--epochs", 0.5, *DET, *DATA], nproc=2)
    # 24 images: 12 per rank, 2 per rank per step: half an epoch is 3 steps
    assert torch.load(tmp_path / "det" / "checkpoint.pth", weights_only=True)["step"] == 3


# --- The demo, the CLI defaults, bad input --------------------------------------------------------
def test_demo_writes_the_claims_and_the_pseudo_box_quality(tmp_path, monkeypatch):
    tiny = dict(dap.DEMO, object_images=16, pseudo_box_images=12, object_test=8, scenes=80, test_scenes=4,
                classifier_steps=8, cam_scales=[64, 128], pretrain_steps=8, finetune_steps=8, batch_size=2, cache=str(tmp_path / "cache"))
    monkeypatch.setattr(dap, "DEMO", tiny)
    args = parse("--demo", "--seed", 1, "--out", tmp_path / "demo")
    dap.demo(args)
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    check_demo_result(result)
    assert result["script"] == "dap.py" and result["seed"] == 1
    assert [(c["claim"], c["metric"], c["better"]["name"], c["worse"]["name"]) for c in result["claims"]] == [
        ("DAP > CLS at 5-shot", "AP50", "DAP", "CLS"), ("DAP > CLS at 5-shot", "AP", "DAP", "CLS")]
    t = result["tables"]
    assert 0 <= t["classifier"]["top1"] <= 1 and set(t["pseudo_boxes"]) == {"corloc", "recall", "boxes_per_image"}
    assert t["finetune"]["kshot_images"] == 40  # 5 images per class, 8 classes
    assert t["finetune"]["DAP"]["AP50"] == result["claims"][0]["better"]["value"]
    with pytest.raises(FileExistsError, match="--resume auto"):
        dap.demo(args)  # an existing demo folder is not overwritten
    dap.demo(parse("--demo", "--seed", 1, "--out", tmp_path / "demo", "--resume", "auto"))  # finished steps reused


def test_cli_defaults_are_the_papers():
    a = parse("pseudo-boxes", "--out", "x", "--classifier", "c")
    assert (a.scales, a.thresholds, a.nms_iou, a.box_variant) == ([288, 576], [0.2, 0.3, 0.4, 0.5], 0.8, "paper")
    a = dap.apply_pretrain_schedule(parse("pretrain", "--out", "x", "--pseudo-boxes", "b", "--classifier", "c"))
    assert (a.arch, a.backbone, a.scales, a.batch_size, a.epochs) == ("faster_rcnn_fpn", "resnet50", [96, 160, 320, 640], 32, 1)
    assert (a.lr, a.lr_batch, a.warmup_iters, a.weight_decay, a.freeze_backbone) == (0.008, 64, 2000, 1e-4, False)
    assert a.iters == 0 and a.warmup_factor == 0.01  # the released config's warm-up factor
    a = dap.apply_protocol(parse("finetune", "--out", "x", "--init", "c"))
    assert (a.protocol, a.lr, a.lr_batch, a.batch_size, a.epochs, a.scales, a.test_size) == ("voc07", 0.01, 16, 16, 14, [640], 640)
    assert a.milestones == [10 / 14] and a.weight_decay == 1e-4 and a.train_split == "trainval"
    a = dap.apply_protocol(parse("finetune", "--out", "x", "--init", "c", "--protocol", "coco", "--lr", "0.01"))
    assert (a.iters, a.lr, a.scales, a.max_size, a.milestones) == (90000, 0.01, [800], 1333, [60 / 90, 80 / 90])
    a = parse("classify", "--out", "x")
    assert (a.epochs, a.batch_size, a.lr * a.batch_size / 256) == (50, 8192, 3.2)
    assert parse("--demo").demo and parse("--demo").out == "runs/dap_demo"


def test_bad_inputs_give_clear_errors(pipeline, tmp_path):
    env = pipeline["env"]
    with pytest.raises(FileNotFoundError, match="meta.json missing"):
        dap.pretrain_detector(parse("pretrain", "--out", tmp_path, "--pseudo-boxes", tmp_path / "none",
                                    "--classifier", pipeline["cls"], *DET, *DATA), env)
    with pytest.raises(FileNotFoundError, match=r"--resume .*nope.pth: no such file"):
        dap.pretrain_detector(parse("pretrain", "--out", tmp_path, "--pseudo-boxes", pipeline["boxes"], "--classifier",
                                    pipeline["cls"], "--resume", tmp_path / "nope.pth", *DET, *DATA), env)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        dap.generate_pseudo_boxes(parse("pseudo-boxes", "--out", tmp_path / "b", "--classifier", tmp_path / "no.pth",
                                        *DATA), env)
    with pytest.raises(ValueError, match="2-D"):
        dap.cam_to_boxes(torch.zeros(2, 3, 3))


# --- Full-scale defects (issue 13) -----------------------------------------------------------------
def test_classify_weights_keeps_the_trained_fc_and_refuses_another_class_set(tmp_path):
    torch.manual_seed(0)
    source = build_classifier("resnet18", 3).state_dict()
    torch.save(source, tmp_path / "w.pth")
    env = init_distributed("cpu")
    ck = torch.load(dap.train_classifier(parse("classify", "--out", tmp_path / "cls", "--backbone", "resnet18",
                                               "--weights", tmp_path / "w.pth"), env), weights_only=True)
    assert torch.equal(ck["model"]["fc.weight"], source["fc.weight"])  # the CAMs' fc, not a random one
    assert torch.equal(ck["model"]["fc.bias"], source["fc.bias"])
    for c in ("a", "b"):  # an ImageFolder of 2 classes: the 3-class fc cannot make its CAMs
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / c / "x.png")
    with pytest.raises(ValueError, match="2 classes.*fc"):
        dap.train_classifier(parse("classify", "--out", tmp_path / "c2", "--backbone", "resnet18", "--weights",
                                   tmp_path / "w.pth", "--data", tmp_path / "data"), env)
    torch.save({k: v for k, v in source.items() if not k.startswith("fc.")}, tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="no classifier layer fc.weight"):
        dap.train_classifier(parse("classify", "--out", tmp_path / "c3", "--backbone", "resnet18", "--weights",
                                   tmp_path / "backbone.pth"), env)


def test_finetune_eval_only_evaluates_the_fine_tuned_box_predictor(pipeline, tmp_path, monkeypatch):
    argv = ["finetune", "--kshot", 1, "--iters", 2, "--train-split", "train", "--test-split", "test",
            "--test-images", 2, *DET, *DATA]
    dap.finetune_detector(parse(*argv, "--out", tmp_path / "ft", "--init", pipeline["det"]), pipeline["env"])
    trained = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)["model"]
    seen = {}
    real = dap.evaluate_detector
    monkeypatch.setattr(dap, "evaluate_detector", lambda model, *a, **kw: seen.setdefault("sd", model.state_dict())
                        and real(model, *a, **kw))
    dap.finetune_detector(parse(*argv, "--out", tmp_path / "ev", "--init", tmp_path / "ft" / "checkpoint.pth",
                                "--eval-only"), pipeline["env"])
    for k, v in trained.items():  # every tensor evaluated is the fine-tuned one, the box predictor too
        assert torch.equal(seen["sd"][k], v), k
    with pytest.raises(ValueError, match="not a fine-tuned detector"):  # a classifier has no heads to evaluate
        dap.finetune_detector(parse(*argv, "--out", tmp_path / "ev2", "--init", pipeline["cls"], "--eval-only"),
                              pipeline["env"])


def test_pretrain_checkpoints_inside_its_one_epoch(pipeline, tmp_path, monkeypatch):
    assert parse("pretrain", "--out", "x").checkpoint_every == 1000  # on by default: Step 3 is one long epoch
    real = dap.train_detector

    def killed_at_step_4(*a, **kw):
        def stop(step):
            if step == 4:
                raise KeyboardInterrupt
        return real(*a, **dict(kw, on_step_end=stop))

    monkeypatch.setattr(dap, "train_detector", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):  # 24 images at batch 4: one epoch is 6 steps
        dap.pretrain_detector(parse("pretrain", "--out", tmp_path, "--pseudo-boxes", pipeline["boxes"], "--classifier",
                                    pipeline["cls"], "--epochs", 1, "--checkpoint-every", 3, *DET, *DATA),
                              pipeline["env"])
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 3  # --resume auto goes on from it


def test_retinanet_schedules_are_the_papers_and_warm_up_is_maskrcnn_benchmarks():
    a = dap.apply_pretrain_schedule(parse("pretrain", "--arch", "retinanet"))  # Sec. 4.4
    assert (a.iters, a.batch_size, a.lr * a.batch_size / a.lr_batch) == (80072, 32, 0.005)
    a = dap.apply_pretrain_schedule(parse("pretrain", "--arch", "retinanet", "--epochs", "2"))
    assert (a.iters, a.epochs) == (0, 2)  # --epochs alone means epochs
    a = dap.apply_protocol(parse("finetune", "--init", "c", "--protocol", "coco", "--arch", "retinanet"))
    assert (a.lr, a.lr_batch, a.iters) == (0.01, 16, 90000)  # RetinaNet 1x, not Faster R-CNN's 0.02
    assert dap.apply_protocol(parse("finetune", "--init", "c", "--protocol", "coco")).lr == 0.02
    a = parse("finetune", "--init", "c")
    assert (a.warmup_iters, a.warmup_factor) == (500, 1 / 3)  # maskrcnn-benchmark's WARMUP_ITERS / WARMUP_FACTOR
    helps = " ".join(dap.get_args_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())
    assert "voc 0.01 at batch 16" in helps and "voc 640, coco 800" in helps  # None defaults say the paper's values


def test_voc_kshot_is_drawn_from_07_plus_12(tmp_path):
    with pytest.raises(ValueError, match="07\\+12 trainval"):
        dap.finetune_detector(parse("finetune", "--init", "c", "--kshot", 5, "--data", tmp_path / "VOC2007",
                                    "--out", tmp_path / "ft", "--device", "cpu"), init_distributed("cpu"))


def test_an_images_cam_does_not_depend_on_its_batch():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 8).eval()
    small = (torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), 2)
    wide = (torch.randint(0, 256, (3, 64, 200), dtype=torch.uint8), 5)  # pads `small` to 7 cells wide in a batch
    collate = dap.CamInputs([64, 128])
    alone, _ = dap.multiscale_cams(model, *collate([(0, small)])[:2])
    together, grid = dap.multiscale_cams(model, *collate([(0, small), (1, wide)])[:2])
    assert grid[0].tolist() == [4, 4] and together.shape[1:] == (4, 13)
    assert torch.allclose(together[0, :4, :4], alone[0], atol=1e-5)
    b1, _ = dap.cams_to_boxes(alone)
    b2, i2 = dap.cams_to_boxes(together, sizes=grid)
    assert torch.allclose(b1, b2[i2 == 0], atol=1e-4)


def test_released_variant_is_the_released_code():
    # 4-connected components (scipy's default): two squares touching at a corner are two objects
    cam = torch.zeros(20, 20)
    cam[2:6, 2:6] = cam[6:10, 6:10] = 1.0
    assert len(dap.cam_to_boxes(cam)) == 1 and len(dap.cam_to_boxes(cam, variant="released")) == 2
    # no re-normalisation of the (already normalised) map: a 0.25 floor is above tau = 0.2
    cam = torch.full((20, 20), 0.25)
    cam[5:10, 5:10] = 0.45
    assert torch.allclose(dap.cam_to_boxes(cam), torch.tensor([[5.0, 5, 10, 10]]), atol=0.3)
    assert dap.cam_to_boxes(cam, variant="released")[0].tolist() == pytest.approx([0, 0, 20, 20], abs=0.6)
    # moments over every thresholded pixel in the component's rectangle, weighted cam + 0.22
    cam = torch.zeros(24, 24)
    cam[2:20, 2:4] = 1.0  # an L: a bar down the left ...
    cam[18:20, 2:20] = 1.0  # ... and along the bottom
    cam[5:8, 14:17] = 1.0  # a blob inside the L's rectangle, not touching it (dropped: under half its area)
    ys, xs = np.nonzero(cam[2:20, 2:20].numpy())
    x, y = xs + 2 + 0.5, ys + 2 + 0.5  # the same weight 1.22 everywhere: plain moments
    want = [x.mean() - np.sqrt(12 * x.var()) / 2, y.mean() - np.sqrt(12 * y.var()) / 2,
            x.mean() + np.sqrt(12 * x.var()) / 2, y.mean() + np.sqrt(12 * y.var()) / 2]
    rel = dap.cam_to_boxes(cam, variant="released")
    assert len(rel) == 1 and rel[0].tolist() == pytest.approx(np.clip(want, 0, 24), abs=1e-4)  # clipped to the map


def test_classify_accumulates_to_the_global_batch(tmp_path):
    env = init_distributed("cpu")
    dap.train_classifier(parse("classify", "--out", tmp_path, "--backbone", "resnet18", "--epochs", 1,
                               "--batch-size", 8, "--accumulate", 2, "--crop-size", 32, *DATA), env)
    # 24 images, batches of 8 / 2 = 4: 6 batches, one update every 2
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["step"] == 3
    with pytest.raises(ValueError, match="does not split"):
        dap.train_classifier(parse("classify", "--out", tmp_path / "b", "--batch-size", 6, "--accumulate", 4,
                                   *DATA), env)
