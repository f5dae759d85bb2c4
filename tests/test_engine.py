"""common.engine and common.distributed: exact resume (in-process, after a SIGKILL with workers, on
2 ranks), --resume, logs, checkpoint errors, AMP on the CPU, non-finite stop, atomic checkpoints,
schedules, and a 2-process torchrun run of the engine (gloo)."""
import json
import math

import pytest
import torch

from common.data import build_loader, detection_transforms
from common.synthetic import SyntheticDetection
from common.detectors import build_detector
from common.distributed import seed_everything
from common.engine import (build_scheduler, check_finite, load_checkpoint, resolve_resume, save_checkpoint,
                           train_detector)

from conftest import run_torchrun
from engine_train import loss_ce, train as tiny


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


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory, root):
    out = tmp_path_factory.mktemp("ddp")
    run_torchrun([root / "tests" / "ddp_engine_smoke.py", out])
    return out


def test_torchrun_two_processes(torchrun_out):
    tmp_path = torchrun_out
    out = json.loads((tmp_path / "ddp.json").read_text())
    assert out["world"] == 2
    assert out["checksums"][0] == out["checksums"][1]  # DDP kept the ranks in step
    assert out["n_preds"] == 5 and out["ids"] == [1, 2, 3, 4, 5]  # gathered, padding removed, in order
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only


# --- the engine's bookkeeping (checkpoints, logs, errors) on a tiny model: milliseconds per step ---
def _log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_flag_one_contract(tmp_path, capsys):
    assert resolve_resume("", tmp_path) is None and resolve_resume(None, tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # nothing to continue: a fresh run
    assert "starting a fresh run" in capsys.readouterr().out
    (tmp_path / "checkpoint.pth").write_bytes(b"x")
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoint.pth"
    elsewhere = tmp_path / "old" / "checkpoint.pth"
    with pytest.raises(FileNotFoundError, match=r"--resume .*old/checkpoint.pth: no such file.*--resume auto"):
        resolve_resume(str(elsewhere), tmp_path)
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"x")
    assert resolve_resume(str(elsewhere), tmp_path) == elsewhere  # another run's checkpoint, continued here
    # several trainings in one run (teacher and student, ...), each in its folder under run_dir: a
    # path names one of them and every training continues from its own checkpoint
    (tmp_path / "teacher").mkdir()
    assert resolve_resume(str(elsewhere), tmp_path / "teacher", run_dir=tmp_path) is None
    assert resolve_resume(str(elsewhere), tmp_path, run_dir=tmp_path) == tmp_path / "checkpoint.pth"
    with pytest.raises(ValueError, match="several trainings.*--resume auto"):
        resolve_resume(str(elsewhere), tmp_path / "teacher", run_dir=tmp_path / "teacher")


def test_stale_temporary_checkpoints_are_removed_on_start(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    stale = tmp_path / ".checkpoint.pth.4242.tmp"  # a run SIGKILLed while saving
    stale.write_bytes(b"half a checkpoint")
    tiny(tmp_path, max_steps=1)
    assert not stale.exists() and (tmp_path / "checkpoint.pth").is_file()


def test_fresh_run_into_an_old_output_folder_refuses(tmp_path):
    tiny(tmp_path, max_steps=2)
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"metrics.jsonl.*earlier run.*--resume auto"):
        tiny(tmp_path, max_steps=2)
    assert (tmp_path / "metrics.jsonl").read_text() == before  # nothing appended, nothing overwritten


def test_resumed_log_is_cut_at_the_checkpoint_and_logs_the_lr_each_step_used(tmp_path):
    tiny(tmp_path / "a")

    def crash(step):  # dies after logging step 3, whose checkpoint (every 2 steps) was never written
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny(tmp_path / "b", checkpoint_every=2, on_step_end=crash)
    assert [l["step"] for l in _log(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3]
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and a line torn by the kill
    tiny(tmp_path / "b", resume=tmp_path / "b" / "checkpoint.pth", checkpoint_every=2)
    full, resumed = _log(tmp_path / "a" / "metrics.jsonl"), _log(tmp_path / "b" / "metrics.jsonl")
    assert [l["step"] for l in resumed] == list(range(1, 9))
    assert [l["loss"] for l in resumed] == [l["loss"] for l in full]
    # warm-up 0.1 -> 1 over 4 steps: step k (1-based) ran at 0.1 x (0.1 + 0.9 (k - 1) / 4)
    assert [l["lr"] for l in full[:5]] == pytest.approx([0.01, 0.0325, 0.055, 0.0775, 0.1])


def test_a_weights_only_file_given_to_resume_is_a_clear_error(tmp_path):
    model = tiny(tmp_path / "a", max_steps=1)
    weights = tmp_path / "weights.pth"
    save_checkpoint(weights, {"model": model.state_dict(), "args": {}})
    with pytest.raises(ValueError, match=r"weights.pth holds weights only \(no optimizer.*not --resume"):
        tiny(tmp_path / "b", resume=weights)


def test_resume_with_other_trained_parameters_is_a_clear_error(tmp_path):
    tiny(tmp_path, max_steps=2)
    with pytest.raises(ValueError, match=r"checkpoint.pth was written by a run that trained other parameters.*"
                                         r"frozen=False \(checkpoint\) vs True \(now\)"):
        tiny(tmp_path, resume=tmp_path / "checkpoint.pth", frozen=True)


def test_amp_on_the_cpu_is_bfloat16_autocast(tmp_path):
    seen = []

    def loss_fn(model, images, targets):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        losses = loss_ce(model, images, targets)
        seen.append(model(torch.stack(images)).dtype)
        return losses

    tiny(tmp_path, max_steps=1, amp=True, loss_fn=loss_fn)
    assert seen == [(True, torch.bfloat16), torch.bfloat16]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["step"] == 1


def test_torchrun_resume_on_two_ranks_is_exact(torchrun_out):
    out = json.loads((torchrun_out / "resume.json").read_text())
    assert out["tensors"] > 100 and out["differ"] == [], out


def test_sigkill_mid_epoch_with_workers_then_resume_is_exact(tmp_path, root):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = root / "tests" / "engine_train.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    full = tiny(tmp_path / "full", workers=2, checkpoint_every=1).state_dict()  # uninterrupted, in-process
    killed = subprocess.Popen([sys.executable, script, tmp_path / "cut", "--hang-at", "6"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "cut" / "hanging").exists():  # step 6 done, its checkpoint not yet written
            assert killed.poll() is None and time.time() < deadline, "the training process died before step 6"
            time.sleep(0.2)
        workers = subprocess.run(["pgrep", "-P", str(killed.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) >= 2  # the DataLoader workers are alive, prefetching epoch 1
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(30)
    finally:
        try:
            os.killpg(killed.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass
    state = load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 1, 5)  # mid-epoch
    p = subprocess.run([sys.executable, script, tmp_path / "cut", "--resume", "auto"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    resumed = load_checkpoint(tmp_path / "cut" / "final.pth")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full), (full, resumed)
    assert [l["step"] for l in _log(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 9))


class _Points(torch.utils.data.Dataset):
    def __init__(self, n=8):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], {"y": self.y[i]}


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    """accumulate=2 over batches of 2 makes the updates of batches of 4 (a mean loss, no BN)."""
    def run(out, batch, accumulate):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = build_scheduler(opt, 4)

        def mse(model, images, targets):
            pred = model(torch.stack(images))[:, 0]
            return {"mse": ((pred - torch.stack([t["y"] for t in targets])) ** 2).mean()}
        loader = build_loader(_Points(), batch, True, workers=0, group_by_aspect_ratio=False)
        train_detector(model, loader, opt, sched, epochs=2, out_dir=out, loss_fn=mse, log_every=1,
                       accumulate=accumulate)
        return model, [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]

    full, steps_full = run(tmp_path / "a", 4, 1)
    acc, steps_acc = run(tmp_path / "b", 2, 2)
    assert steps_full == steps_acc == [1, 2, 3, 4]  # 2 updates per epoch either way
    for x, y in zip(full.parameters(), acc.parameters()):
        assert torch.allclose(x, y, atol=1e-6)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pth")["step"] == 4
