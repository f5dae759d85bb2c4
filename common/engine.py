"""The detection training loop the scripts share, its LR schedules, atomic checkpoints and
JSON-lines metrics. The loop is one readable function; methods change what it optimises through
`loss_fn` and keep their own state (teachers, class statistics) in `extra_state`."""
from __future__ import annotations

import bisect
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import set_epoch
from .distributed import is_main, reduce_dict, unwrap


class JsonlLogger:
    """Appends one JSON object per line to `path` (rank 0 only)."""

    def __init__(self, path):
        self.path = Path(path)
        if is_main():
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **fields) -> None:
        if is_main():
            with open(self.path, "a") as f:
                f.write(json.dumps(fields) + "\n")


def save_checkpoint(path, state: dict) -> None:
    """Write `state` to a temporary file beside `path`, then rename: a crash never leaves a
    half-written checkpoint. Rank 0 only."""
    if not is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """Load a checkpoint of this project with `weights_only=True` (tensors and plain values only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}. --resume takes the checkpoint.pth that an "
                                f"earlier run wrote into its --output-dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated file, foreign pickle: same user-facing problem
        raise ValueError(f"cannot read checkpoint {path} ({e.__class__.__name__}: {e}). It is truncated or "
                         f"not a checkpoint of this project (only tensors and plain values load safely)") from e


def build_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, warmup_factor: float = 0.001,
                    schedule: str = "step", milestones=(), gamma: float = 0.1, final_factor: float = 0.0):
    """Per-iteration LR multiplier: linear warm-up from `warmup_factor` to 1 over `warmup_steps`,
    then "step" (x `gamma` at each milestone iteration), "cosine" (from 1 to `final_factor` at
    `total_steps`) or "constant"."""
    if schedule not in ("step", "cosine", "constant"):
        raise ValueError(f"unknown schedule {schedule!r}")
    milestones = sorted(milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor + (1 - warmup_factor) * step / warmup_steps
        if schedule == "step":
            return gamma ** bisect.bisect_right(milestones, step)
        if schedule == "cosine":
            t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return final_factor + (1 - final_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def check_finite(losses: dict, step: int) -> None:
    """Stop with the step and every loss term when any term is NaN or infinite."""
    if not all(math.isfinite(float(v)) for v in losses.values()):
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        raise FloatingPointError(f"non-finite loss at step {step}: {terms}. Lower the learning rate, "
                                 f"lengthen the warm-up or clip gradients (--clip-grad)")


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    mt = np.random.get_state()
    state["numpy"] = [mt[0], torch.from_numpy(mt[1].astype(np.int64)), int(mt[2]), int(mt[3]), float(mt[4])]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_device(targets, device):
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


def default_loss(model, images, targets) -> dict:
    """torchvision detectors return their loss dict in training mode."""
    return model(images, targets)


def train_detector(model, loader, optimizer, scheduler, *, epochs: int, out_dir, args=None, loss_fn=None,
                   clip_grad: float = 0.0, amp: bool = False, checkpoint_every: int = 0, resume=None,
                   extra_state: dict | None = None, log_every: int = 20, max_steps: int | None = None,
                   on_step_end=None, on_epoch_end=None, desc: str = "train"):
    """Train `model` (DDP-wrapped or not) for `epochs` epochs (or until `max_steps` iterations).

    Every step: loss_fn(model, images, targets) -> dict of loss terms, summed; terms are averaged
    over ranks and checked for NaN/inf before the update; AMP (float16 + GradScaler) on CUDA when
    `amp`; optional gradient-norm clipping; the scheduler steps per iteration. Writes
    `out_dir/metrics.jsonl` and `out_dir/checkpoint.pth` (at each epoch end and every
    `checkpoint_every` steps) holding model, optimizer, scheduler, scaler, epoch, batch, step, RNG
    state, args and `extra_state` (objects with state_dict / load_state_dict). `resume` (a path)
    continues exactly where that checkpoint stopped: on the CPU with a fixed seed a resumed run ends
    with the same weights as an uninterrupted one. Callbacks: on_step_end(step), on_epoch_end(epoch).
    """
    loss_fn = loss_fn or default_loss
    extra_state = extra_state or {}
    out_dir = Path(out_dir)
    device = next(unwrap(model).parameters()).device
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    logger = JsonlLogger(out_dir / "metrics.jsonl")
    ckpt_path = out_dir / "checkpoint.pth"
    params = [p for p in model.parameters() if p.requires_grad]
    epoch, start_batch, step = 0, 0, 0
    if resume:
        state = load_checkpoint(resume)
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {resume} does not fit this model (different --arch, --backbone or "
                             f"number of classes?): {str(e).splitlines()[0]}") from e
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        for name, obj in extra_state.items():
            obj.load_state_dict(state["extra"][name])
        set_rng_state(state["rng"])
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        print(f"resumed from {resume}: epoch {epoch}, batch {start_batch}, step {step}")

    def checkpoint(epoch_, batch_):
        save_checkpoint(ckpt_path, {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch_, "batch": batch_, "step": step, "rng": rng_state(),
            "args": dict(vars(args)) if args is not None and not isinstance(args, dict) else (args or {}),
            "extra": {name: obj.state_dict() for name, obj in extra_state.items()}})

    done = max_steps is not None and step >= max_steps
    while epoch < epochs and not done:
        set_epoch(loader, epoch, start_batch)
        model.train()
        bar = tqdm(total=len(loader), initial=start_batch, desc=f"{desc} epoch {epoch}", disable=not is_main())
        t_data = time.perf_counter()
        batch = start_batch - 1
        for batch, (images, targets) in enumerate(loader, start=start_batch):
            images = [im.to(device, non_blocking=True) for im in images]
            targets = _to_device(targets, device)
            t_step = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                losses = loss_fn(model, images, targets)
            loss = sum(losses.values())
            logged = reduce_dict({k: v.detach().float() for k, v in losses.items()})
            check_finite(logged, step)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if on_step_end is not None:
                on_step_end(step)
            now = time.perf_counter()
            if step % log_every == 0 or step == 1:
                logger.log(step=step, epoch=epoch, lr=optimizer.param_groups[0]["lr"],
                           loss=sum(logged.values()), **logged, data_time=t_step - t_data, step_time=now - t_step)
            bar.set_postfix(loss=f"{sum(logged.values()):.3f}")
            bar.update()
            if checkpoint_every and step % checkpoint_every == 0:
                checkpoint(epoch, batch + 1)
            t_data = time.perf_counter()
            if max_steps is not None and step >= max_steps:
                done = True
                break
        bar.close()
        start_batch = 0
        if not done or batch + 1 == len(loader):
            epoch += 1
            checkpoint(epoch, 0)
            if on_epoch_end is not None:
                on_epoch_end(epoch - 1)
        else:
            checkpoint(epoch, batch + 1)
    return model
