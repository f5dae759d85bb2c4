"""common.engine and common.distributed: exact resume, non-finite stop, atomic checkpoints,
schedules, and a 2-process torchrun run of the engine (gloo)."""
import json
import math

import pytest
import torch

from common.data import build_loader, detection_transforms
from common.synthetic import SyntheticDetection
from common.detectors import build_detector
from common.distributed import seed_everything
from common.engine import (build_scheduler, check_finite, load_checkpoint, save_checkpoint,
                           train_detector)

from conftest import run_torchrun


def _run(out, resume=None, max_steps=None, workers=0):
    seed_everything(0)
    ds = SyntheticDetection(8, 64, transforms=detection_transforms(True, scales=(48, 64), max_size=96))
    model = build_detector("faster_rcnn_fpn", 8, backbone="resnet18", min_size=64, max_size=96,
                           anchor_sizes=(16, 32, 64, 128, 256), rpn_batch_size_per_image=32,
                           box_batch_size_per_image=32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    sched = build_scheduler(opt, 8, warmup_steps=2)
    train_detector(model, build_loader(ds, 4, True, workers=workers), opt, sched, epochs=2, out_dir=out,
                   checkpoint_every=1, resume=resume, max_steps=max_steps, log_every=1)
    return model


def test_resume_mid_epoch_gives_identical_weights(tmp_path):
    full = _run(tmp_path / "a")
    _run(tmp_path / "b", max_steps=3)  # "killed" mid-way through epoch 1
    resumed = _run(tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pth")
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4] and all(math.isfinite(l["loss"]) for l in lines)
    state = load_checkpoint(tmp_path / "a" / "checkpoint.pth")
    assert {"model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "args"} <= set(state)
    assert state["epoch"] == 2 and state["step"] == 4


def test_non_finite_loss_stops_with_step_and_terms(tmp_path):
    check_finite({"a": 1.0, "b": 2.0}, 5)
    with pytest.raises(FloatingPointError, match=r"step 7: a=1, b=nan"):
        check_finite({"a": 1.0, "b": float("nan")}, 7)
    seed_everything(0)
    ds = SyntheticDetection(4, 64, transforms=detection_transforms(True, scales=(64,), max_size=96))
    model = build_detector("faster_rcnn_fpn", 8, backbone="resnet18", min_size=64, max_size=96,
                           rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

    def exploding(model, images, targets):
        losses = model(images, targets)
        losses["loss_classifier"] = losses["loss_classifier"] * float("inf")
        return losses

    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 0: .*loss_classifier=inf"):
        train_detector(model, build_loader(ds, 2, True, workers=0), opt, build_scheduler(opt, 2), epochs=1,
                       out_dir=tmp_path, loss_fn=exploding)
    assert not (tmp_path / "checkpoint.pth").exists()  # nothing written half-way


def test_checkpoints_are_atomic_and_checked(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "args": {"lr": 0.1}})
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pth"]
    assert load_checkpoint(path)["args"]["lr"] == 0.1
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="truncated or not a checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="--resume"):
        load_checkpoint(tmp_path / "nope.pth")


def test_schedules():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = build_scheduler(opt, 100, warmup_steps=10, warmup_factor=0.1, schedule="step", milestones=(50, 80))
    f = s.lr_lambdas[0]
    assert f(0) == pytest.approx(0.1) and f(5) == pytest.approx(0.55) and f(10) == 1
    assert f(49) == 1 and f(50) == pytest.approx(0.1) and f(80) == pytest.approx(0.01)
    c = build_scheduler(opt, 100, warmup_steps=10, schedule="cosine").lr_lambdas[0]
    assert c(10) == pytest.approx(1) and c(55) == pytest.approx(0.5) and c(100) == pytest.approx(0)


def test_torchrun_two_processes(tmp_path, root):
    run_torchrun([root / "tests" / "ddp_engine_smoke.py", tmp_path])
    out = json.loads((tmp_path / "ddp.json").read_text())
    assert out["world"] == 2
    assert out["checksums"][0] == out["checksums"][1]  # DDP kept the ranks in step
    assert out["n_preds"] == 5 and out["ids"] == [1, 2, 3, 4, 5]  # gathered, padding removed, in order
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only
