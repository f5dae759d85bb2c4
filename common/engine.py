"""The detection training loop the scripts share, its LR schedules, atomic checkpoints, JSON-lines
metrics, the `--resume` contract and the `--amp` precision. The loop is one readable function;
methods change what it optimises through `loss_fn` and keep their own state (teachers, class
statistics) in `extra_state`."""
from __future__ import annotations

import bisect
import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .data import set_epoch
from .distributed import all_gather_object, broadcast_object, get_rank, get_world_size, is_main, reduce_dict, unwrap


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
                                f"earlier run wrote into its output folder, or auto")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated file, foreign pickle: same user-facing problem
        raise ValueError(f"cannot read checkpoint {path} ({e.__class__.__name__}: {e}). It is truncated or "
                         f"not a checkpoint of this project (only tensors and plain values load safely)") from e


def resolve_resume(resume, out_dir, run_dir=None) -> Path | None:
    """What every script's `--resume` means for the training that writes into `out_dir`: "" (or
    None) a fresh run; "auto" out_dir/checkpoint.pth when there is one, else a fresh run; anything
    else is the path of a checkpoint, which must exist. A script that runs several trainings in one
    invocation, each in its own folder under `run_dir` (teacher and student, one per network),
    passes `run_dir`: a path must then be the checkpoint of one of them, and every training
    continues from its own checkpoint, as with "auto"."""
    if not resume:
        return None
    own = Path(out_dir) / "checkpoint.pth"
    if str(resume) != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume {path}: no such file. Give the checkpoint.pth an earlier run wrote into "
                                    f"its output folder, or --resume auto (the output folder's checkpoint when there "
                                    f"is one, a fresh run otherwise)")
        if run_dir is None:
            return path
        if Path(run_dir).resolve() not in path.resolve().parents:
            raise ValueError(f"--resume {path}: this script runs several trainings, each with a checkpoint.pth in its "
                             f"own folder under {run_dir}; give one of those, or --resume auto to continue them all")
    if own.is_file():
        return own
    if is_main():
        print(f"--resume {resume}: no checkpoint in {out_dir}, starting a fresh run")
    return None


def autocast(device, enabled: bool = True):
    """The mixed precision of `--amp`: float16 on CUDA (trained with a GradScaler), bfloat16 on the
    CPU (float32's exponent range, so no loss scaling is needed)."""
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


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
    """This process's random generators (torch, Python, NumPy, its current CUDA device)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    mt = np.random.get_state()
    state["numpy"] = [mt[0], torch.from_numpy(mt[1].astype(np.int64)), int(mt[2]), int(mt[3]), float(mt[4])]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # older checkpoints: every device of the process
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


def _args_differ(saved, now) -> str:
    """'; its arguments differ from this run's in: k=v (checkpoint) vs w (now), ...' or ''."""
    now = now if isinstance(now, dict) or now is None else vars(now)
    if not isinstance(saved, dict) or not now:
        return ""
    keys = [k for k in saved if k in now and k != "resume" and saved[k] != now[k]]
    return ("; its arguments differ from this run's in: " +
            ", ".join(f"{k}={saved[k]!r} (checkpoint) vs {now[k]!r} (now)" for k in keys)) if keys else ""


def _cut_log(path: Path, step: int) -> None:
    """Keep the lines of a resumed run's log up to the last one of a step <= `step` (the checkpoint's):
    the steps the resumed run repeats, lines written after them and a line torn by a kill go."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = 0
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not line.endswith("\n") or not isinstance(record, dict):
            break
        if "step" in record:
            if record["step"] > step:
                break
            keep = i + 1
    if keep < len(lines):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(lines[:keep]))
        os.replace(tmp, path)


def _to_device(targets, device):
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
            for t in targets]


def default_loss(model, images, targets) -> dict:
    """torchvision detectors return their loss dict in training mode."""
    return model(images, targets)


def train_detector(model, loader, optimizer, scheduler, *, epochs: int, out_dir, args=None, loss_fn=None,
                   clip_grad: float = 0.0, amp: bool = False, checkpoint_every: int = 0, resume=None,
                   extra_state: dict | None = None, log_every: int = 20, max_steps: int | None = None,
                   on_step_end=None, on_epoch_end=None, desc: str = "train", accumulate: int = 1):
    """Train `model` (DDP-wrapped or not) for `epochs` epochs (or until `max_steps` iterations).

    Every step: loss_fn(model, images, targets) -> dict of loss terms, summed; terms are averaged
    over ranks and checked for NaN/inf before the update; with `amp`, `autocast` (float16 and a
    GradScaler on CUDA, bfloat16 on the CPU); optional gradient-norm clipping; the scheduler steps
    per iteration. Writes `out_dir/metrics.jsonl` (the LR each step used) and `out_dir/checkpoint.pth`
    (at each epoch end and every `checkpoint_every` steps) holding model, optimizer, scheduler,
    scaler, epoch, batch, step, every rank's RNG state, args and `extra_state` (objects with
    state_dict / load_state_dict). `resume` (a path, see `resolve_resume`) continues exactly where
    that checkpoint stopped: on the CPU with a fixed seed a resumed run, on any number of ranks,
    ends with the same weights as an uninterrupted one, and its log is cut back to the checkpoint's
    step. A fresh run refuses an `out_dir` holding an earlier run's log. Temporary files of a save
    that was killed are removed on start. Callbacks: on_step_end(step), on_epoch_end(epoch).
    `accumulate` = n: gradient accumulation, one update (a step) every n loader batches (the last
    group of an epoch may be shorter), each batch's loss divided by n, DDP's all-reduce only on the
    last; the log shows the last batch's losses; checkpoints fall on updates.
    """
    loss_fn = loss_fn or default_loss
    extra_state = extra_state or {}
    out_dir = Path(out_dir)
    device = next(unwrap(model).parameters()).device
    scaler = torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda")  # bfloat16 needs none
    log_path, ckpt_path = out_dir / "metrics.jsonl", out_dir / "checkpoint.pth"
    params = [p for p in model.parameters() if p.requires_grad]
    epoch, start_batch, step = 0, 0, 0
    if resume:
        state = load_checkpoint(resume)
        missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "batch", "step", "rng") if k not in state]
        if missing:
            raise ValueError(f"--resume {resume} holds {'weights only' if 'model' in state else sorted(state)} "
                             f"(no {', '.join(missing)}): not a training checkpoint of this project. To start a "
                             f"training from these weights, pass them as its initial weights (--init, --weights or "
                             f"--pretrained, as the script names them), not --resume")
        try:
            unwrap(model).load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {resume} does not fit this model (different --arch, --backbone or number "
                             f"of classes?){_args_differ(state.get('args'), args)}: {str(e).splitlines()[0]}") from e
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            raise ValueError(f"{resume} was written by a run that trained other parameters than this one ({e}): "
                             f"resume with that run's settings (frozen layers, norm, parameter groups)"
                             f"{_args_differ(state.get('args'), args)}") from e
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # empty when written without CUDA AMP
            scaler.load_state_dict(state["scaler"])
        for name, obj in extra_state.items():
            if name not in state.get("extra", {}):
                raise ValueError(f"{resume} holds no {name!r} state, which this run keeps: it was written by a run "
                                 f"of another method or setting{_args_differ(state.get('args'), args)}")
            obj.load_state_dict(state["extra"][name])
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per rank
        if len(rngs) != get_world_size():
            warnings.warn(f"{resume} was written by {len(rngs)} rank(s), this run has {get_world_size()}: data order "
                          f"and random draws will differ from an uninterrupted run")
        set_rng_state(rngs[get_rank() % len(rngs)])
        epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        if is_main():
            _cut_log(log_path, step)
        print(f"resumed from {resume}: epoch {epoch}, batch {start_batch}, step {step}")
    elif broadcast_object(is_main() and log_path.is_file() and log_path.stat().st_size > 0):
        raise FileExistsError(f"{log_path} holds the log of an earlier run: continue it with --resume auto, or start "
                              f"afresh in another output folder (or after deleting {out_dir})")
    if is_main():
        for stale in (*out_dir.glob(f".{ckpt_path.name}.*.tmp"), *out_dir.glob(f".{log_path.name}.*.tmp")):
            stale.unlink(missing_ok=True)  # a save that was killed half-way
    logger = JsonlLogger(log_path)

    def checkpoint(epoch_, batch_):
        rngs = all_gather_object(rng_state())  # a collective: every rank calls checkpoint()
        save_checkpoint(ckpt_path, {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch_, "batch": batch_, "step": step, "rng": rngs,
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
            update = (batch + 1) % accumulate == 0 or batch + 1 == len(loader)  # the last batch of a group
            if batch % accumulate == 0:
                optimizer.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if update or not hasattr(model, "no_sync") else model.no_sync():
                with autocast(device, amp):
                    losses = loss_fn(model, images, targets)
                loss = sum(losses.values())
                logged = reduce_dict({k: v.detach().float() for k, v in losses.items()})
                check_finite(logged, step)
                scaler.scale(loss / accumulate if accumulate > 1 else loss).backward()
            if not update:
                bar.update()
                continue
            if clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            lr = optimizer.param_groups[0]["lr"]  # the LR of this update
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            if on_step_end is not None:
                on_step_end(step)
            now = time.perf_counter()
            if step % log_every == 0 or step == 1:
                logger.log(step=step, epoch=epoch, lr=lr,
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
