"""The CPU demo recipe the six `--demo`s share, and the `demo.json` result file each one writes.

The recipe is what `benchmarks/bench_learnability.py` measures: on the built-in synthetic data
(`common.synthetic`, difficulty "easy") a ResNet-18 classifier learns the 8 classes and a Faster
R-CNN R18-FPN learns to detect them within minutes on 2 CPU cores, and a pre-trained backbone
beats a random one on a 5-shot subset. common/README.md writes it down.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import write_json_atomic

# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------
DEMO_RECIPE = {
    "backbone": "resnet18",          # torchvision names, so load_weights moves weights between every script
    "object_size": 64,               # object-centric (classification) images, px
    "scene_size": 64,                # detection scenes, px (objects 13-35 px)
    "anchor_sizes": (16, 32, 64, 128, 256),  # one per FPN level P2-P6
    "norm": "bn",                    # trainable BatchNorm: a random init has no statistics to freeze
    "classifier": {"optimizer": "AdamW", "lr": 3e-3, "weight_decay": 0.05, "batch_size": 32,
                   "label_smoothing": 0.1, "schedule": "one-cycle (25% warm-up, cosine)",
                   "augment": "RandomResizedCrop(scale 0.5-1, ratio 3/4-4/3) + flip"},
    "detector": {"optimizer": "AdamW", "lr": 1e-3, "weight_decay": 1e-4, "batch_size": 8,
                 "clip_grad": 10.0, "schedule": "one-cycle (warm-up 50 steps, cosine)", "augment": "flip"},
}

# torchvision detector settings sized for 64-px scenes with up to 6 objects
DEMO_DETECTOR_KWARGS = {
    "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150,
    "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150,
    "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 64, "box_detections_per_img": 50,
}


DEMO_BOX_HEAD = {"representation_size": 256, "roi_sampling_ratio": 1}


def build_demo_detector(num_classes: int, arch: str = "faster_rcnn_fpn", pretrained=None, **overrides) -> nn.Module:
    """The demo detector: `arch` on ResNet-18 with trainable BN, every layer trainable, anchors
    and proposal counts for DEMO_RECIPE's 64-px scenes. An FPN Faster R-CNN gets a lighter box
    head (two fc layers of 256 instead of 1024, RoIAlign with one sample per bin): on a CPU the
    1024-wide head and RoIAlign's backward take two thirds of a step. Tensor names stay
    torchvision's, so backbone weights move with `load_weights` as usual."""
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from .detectors import build_detector

    size = DEMO_RECIPE["scene_size"]
    kwargs = dict(backbone=DEMO_RECIPE["backbone"], norm=DEMO_RECIPE["norm"], trainable_layers=5,
                  min_size=size, max_size=size, anchor_sizes=DEMO_RECIPE["anchor_sizes"])
    if arch in ("faster_rcnn_fpn", "faster_rcnn_c4", "mask_rcnn"):
        kwargs.update(DEMO_DETECTOR_KWARGS)
    kwargs.update(overrides)
    model = build_detector(arch, num_classes, **kwargs)
    if arch == "faster_rcnn_fpn" and kwargs.get("box_head", "2mlp") == "2mlp":
        rep, heads = DEMO_BOX_HEAD["representation_size"], model.roi_heads
        heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, DEMO_BOX_HEAD["roi_sampling_ratio"])
        heads.box_head = TwoMLPHead(model.backbone.out_channels * 7 * 7, rep)
        heads.box_predictor = FastRCNNPredictor(rep, num_classes + 1)
    if pretrained is not None:
        from .detectors import load_weights

        load_weights(model, pretrained)
    return model


def demo_optimizer(params, kind: str = "detector", lr: float | None = None):
    """AdamW at the recipe's LR (or `lr`) and weight decay for `kind` ("detector" or "classifier")."""
    r = DEMO_RECIPE[kind]
    return torch.optim.AdamW(params, lr=r["lr"] if lr is None else lr, weight_decay=r["weight_decay"], fused=True)


def one_cycle(optimizer, total_steps: int, warmup_steps: int):
    """Warm-up from 4% of the LR over `warmup_steps`, then down to ~0 at `total_steps`, both halves
    cosine (torch's OneCycleLR: its anneal_strategy shapes the rise too). OneCycleLR needs two
    steps in each phase: the warm-up lasts at least 2 steps, and a run of under 4 steps keeps its
    LR constant."""
    if total_steps < 4:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, [g["lr"] for g in optimizer.param_groups], total_steps=total_steps,
        pct_start=min(0.5, max(2, warmup_steps) / total_steps), anneal_strategy="cos",
        cycle_momentum=False, div_factor=25.0, final_div_factor=1e3)


def one_cycle_factor(progress: float, pct_start: float) -> float:
    """`one_cycle`'s LR multiplier at a fraction `progress` of the run, the run measured in any unit
    (steps, or compute spent): cosine from 1/25 up to 1 over `pct_start`, then cosine down to 1/25,000."""
    lo, end = 1 / 25.0, 1 / 25.0 / 1e3
    cos = lambda a, b, t: b + (a - b) * (1 + math.cos(math.pi * min(1.0, t))) / 2  # a at t = 0, b at t = 1
    if progress < pct_start:
        return cos(lo, 1.0, progress / pct_start)
    return cos(1.0, end, (progress - pct_start) / max(1e-12, 1 - pct_start))


# --------------------------------------------------------------------------------------------
# demo.json
# --------------------------------------------------------------------------------------------
def claim(text: str, metric: str, better: tuple[str, float], worse: tuple[str, float]) -> dict:
    """One comparison as the paper states it: `better` is what the paper says should win, `worse`
    what should lose, each (name, measured value), whatever the measurement says."""
    return {"claim": text, "metric": metric,
            "better": {"name": better[0], "value": float(better[1])},
            "worse": {"name": worse[0], "value": float(worse[1])}}


def claim_holds(c: dict) -> bool:
    return c["better"]["value"] > c["worse"]["value"]


def check_demo_result(obj: dict) -> None:
    """Raise ValueError naming the first field of `obj` that breaks the demo.json schema."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"demo.json: {what}")
    need(isinstance(obj, dict), "must be a JSON object")
    for key, kind in (("script", str), ("seed", int), ("wall_s", (int, float)), ("claims", list), ("tables", dict)):
        need(isinstance(obj.get(key), kind), f"'{key}' must be {getattr(kind, '__name__', 'a number')}")
    need(len(obj["claims"]) >= 1, "'claims' is empty: a demo states at least the paper's main comparison")
    for k, c in enumerate(obj["claims"]):
        need(isinstance(c, dict) and isinstance(c.get("claim"), str) and isinstance(c.get("metric"), str),
             f"claims[{k}] needs 'claim' and 'metric' strings")
        for side in ("better", "worse"):
            s = c.get(side)
            need(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("value"), (int, float))
                 and math.isfinite(s["value"]), f"claims[{k}].{side} needs a 'name' and a finite 'value'")


def write_demo_result(out_dir, script: str, seed: int, wall_s: float, claims: list[dict], tables: dict) -> Path:
    """Write `out_dir/demo.json` = {script, seed, wall_s, claims, tables} atomically (validated
    first, so a malformed result is never written) and print each claim with whether it held."""
    obj = {"script": script, "seed": int(seed), "wall_s": round(float(wall_s), 1), "claims": claims,
           "tables": tables}
    check_demo_result(obj)
    json.dumps(obj, allow_nan=False)  # every number in the tables is finite
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "demo.json"
    write_json_atomic(obj, path)
    for c in claims:
        print(f"[{'holds' if claim_holds(c) else 'does NOT hold'}] {c['claim']} ({c['metric']}): "
              f"{c['better']['name']} {c['better']['value']:.4g} vs {c['worse']['name']} {c['worse']['value']:.4g}")
    return path


# --------------------------------------------------------------------------------------------
# Train and evaluate at the recipe (one process, no checkpoints: the benchmark and the demos'
# comparisons; the methods' own stages use their scripts' loops)
# --------------------------------------------------------------------------------------------
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batches(n: int, batch_size: int, steps: int, seed: int):
    """`steps` index batches over `n` items: seeded epochs of a permutation (with a random
    top-up when the set is smaller than a batch)."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < steps:
        order = rng.permutation(n)
        if n < batch_size:
            order = np.concatenate([order, rng.integers(n, size=batch_size - n)])
        for k in range(0, len(order) - batch_size + 1, batch_size):
            if done == steps:
                return
            yield order[k:k + batch_size]
            done += 1


def _train_steps(model: nn.Module, kind: str, loss_of, n: int, batch_size: int, steps: int, warmup: int,
                 seed: int, log, clip_grad: float | None = None, lr: float | None = None,
                 budget_s: float | None = None, clock=time.process_time) -> tuple[float, int]:
    """The demo's training loop: `steps` seeded batches of indices into n items, `loss_of(step, indices)`
    -> loss, AdamW at DEMO_RECIPE[kind] (peak LR `lr` when given) with one-cycle LR (`warmup`
    steps), optional gradient clipping. With `budget_s` the run is measured in compute instead:
    it stops before the step that would start with `clock()` (this process's CPU time by default)
    `budget_s` past its start, and the LR follows the same one-cycle curve over the fraction of the
    budget spent (`steps` then only places the warm-up: `warmup / steps` of the budget). Returns
    (training wall time in seconds, steps taken)."""
    if budget_s is not None and not budget_s > 0:
        raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s}: an equal-compute "
                         f"baseline needs the compute the compared run measured")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = demo_optimizer(params, kind, lr)
    if budget_s is None:
        sched = one_cycle(opt, steps, warmup)
    else:
        peaks, pct = [g["lr"] for g in opt.param_groups], min(0.5, max(2, warmup) / max(steps, 4))
    torch.manual_seed(seed)
    model.train()
    wall, done, start = 0.0, 0, clock()
    for step, idx in enumerate(_batches(n, batch_size, steps if budget_s is None else 2 ** 62, seed), start=1):
        if budget_s is not None:
            spent = (clock() - start) / budget_s
            if spent >= 1:
                break
            for g, peak in zip(opt.param_groups, peaks):
                g["lr"] = peak * one_cycle_factor(spent, pct)
        t0 = time.perf_counter()
        loss = loss_of(step, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(params, clip_grad)
        opt.step()
        if budget_s is None:
            sched.step()
        wall += time.perf_counter() - t0
        done = step
        if log and (step % 50 == 0 or step == steps):
            log(f"{kind} step {step}/{steps if budget_s is None else '~%d' % steps} loss {loss.item():.3f} ({wall:.0f} s)")
    return wall, done


def train_demo_classifier(model: nn.Module, dataset, steps: int, seed: int = 0, batch_size: int | None = None,
                          log=print) -> float:
    """Train a classifier on `dataset` ((uint8 image, label) items) with the recipe; returns the
    training wall time in seconds."""
    from torchvision.transforms import v2

    r = DEMO_RECIPE["classifier"]
    batch_size = batch_size or r["batch_size"]
    size = int(dataset[0][0].shape[-1])
    augment = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(0.75, 4 / 3), antialias=True),
                          v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def loss_of(step, idx):
        items = [dataset[int(i)] for i in idx]
        x = torch.stack([augment(im) for im, _ in items])
        y = torch.as_tensor([label for _, label in items])
        return nn.functional.cross_entropy(model(x), y, label_smoothing=r["label_smoothing"])

    return _train_steps(model, "classifier", loss_of, len(dataset), batch_size, steps, max(1, steps // 4), seed, log)[0]


IMAGENET_STANDIN_STEPS = 400  # top-1 0.84-0.93 at 400 steps (benchmark, seeds 0-2); 800 give ~0.98 at twice the cost


def imagenet_standin(seed: int, steps: int = IMAGENET_STANDIN_STEPS, images: int = 3000, cache="runs/synthetic_cache",
                     log=print) -> dict:
    """The demos' stand-in for ImageNet weights, for the methods whose paper starts its detector
    from them (NoisyAnchor, certainty-aware SSOD): the demo classifier (ResNet-18, trainable BN)
    trained `steps` steps on `images` object-centric 64-px images (seed 1000 seed + 1, the
    benchmark's row (a)). Returns {"state_dict", "steps", "wall_s", "cached", "path"}: the
    classifier's weights (torchvision names; load into a detector with
    `build_demo_detector(pretrained=...)`), its training time and the weights' file. With `cache` a
    folder, the images are rendered there (`common.synthetic.RenderCache`) and the weights written
    atomically to `cache/backbones/`; a later call with the same seed, steps and images reads them
    back (wall_s: the original training time). Without `cache` nothing is written ("path": None)."""
    from .detectors import build_classifier
    from .engine import load_checkpoint, save_checkpoint
    from .synthetic import SHAPES, SyntheticDetection

    path = None
    if cache:
        path = Path(cache) / "backbones" / f"classifier-s{seed}-{steps}steps-{images}img.pth"
        if path.is_file():
            saved = load_checkpoint(path)
            return {"state_dict": saved["model"], "steps": steps, "wall_s": saved["wall_s"], "cached": True, "path": str(path)}
    objects = SyntheticDetection(images, DEMO_RECIPE["object_size"], mode="object", seed=1000 * seed + 1, cache=cache)
    rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    model = build_classifier(DEMO_RECIPE["backbone"], len(SHAPES), norm=DEMO_RECIPE["norm"])
    wall = train_demo_classifier(model, objects.classification(), steps, seed=seed, log=log)
    torch.set_rng_state(rng_state)  # the caller's random stream does not depend on the cache
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if path is not None:
        save_checkpoint(path, {"model": state, "wall_s": wall})
    return {"state_dict": state, "steps": steps, "wall_s": wall, "cached": False, "path": str(path) if path else None}


@torch.no_grad()
def evaluate_demo_classifier(model: nn.Module, dataset, batch_size: int = 200) -> float:
    """Top-1 accuracy on `dataset` ((uint8 image, label) items), images as they are."""
    from torchvision.transforms import v2

    norm = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    model.eval()
    correct = 0
    for k in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(k, min(len(dataset), k + batch_size))]
        x = torch.stack([norm(im) for im, _ in items])
        correct += int((model(x).argmax(1) == torch.as_tensor([label for _, label in items])).sum())
    model.train()
    return correct / len(dataset)


def train_demo_detector(model: nn.Module, dataset, steps: int, seed: int = 0, batch_size: int | None = None,
                        warmup_steps: int = 50, log=print, lr: float | None = None) -> float:
    """Train a torchvision detector on `dataset` ((uint8 image, target) items) with the recipe:
    horizontal flips, AdamW, one-cycle LR (peak: the recipe's, or `lr`), gradient clipping.
    Returns the training wall time."""
    loss_of, batch_size = _detector_loss(model, dataset, batch_size)
    return _train_steps(model, "detector", loss_of, len(dataset), batch_size, steps, min(warmup_steps, steps // 4),
                        seed, log, clip_grad=DEMO_RECIPE["detector"]["clip_grad"], lr=lr)[0]


def train_demo_detector_on_budget(model: nn.Module, dataset, budget_s: float, planned_steps: int, seed: int = 0,
                                  clock=time.process_time, warmup_steps: int = 50, log=print) -> int:
    """`train_demo_detector` for a compute budget (an equal-compute baseline): trains until
    `clock()` has advanced `budget_s` seconds, the one-cycle LR spread over the budget (the warm-up
    over min(warmup_steps, planned_steps // 4) / planned_steps of it). Returns the steps taken."""
    loss_of, batch_size = _detector_loss(model, dataset, None)
    return _train_steps(model, "detector", loss_of, len(dataset), batch_size, planned_steps,
                        min(warmup_steps, planned_steps // 4), seed, log, clip_grad=DEMO_RECIPE["detector"]["clip_grad"],
                        budget_s=budget_s, clock=clock)[1]


def _detector_loss(model: nn.Module, dataset, batch_size: int | None):
    """The recipe's detector loss on a batch of indices (flip augmentation, a clear error on a
    non-finite loss), and the batch size (the recipe's unless given)."""
    from .data import collate_detection, detection_transforms

    size = DEMO_RECIPE["scene_size"]
    augment = detection_transforms(True, scales=(size,), max_size=size)

    def loss_of(step, idx):
        images, targets = collate_detection([augment(*dataset[int(i)]) for i in idx])
        losses = model(list(images), list(targets))
        loss = sum(losses.values())
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"non-finite detector loss at step {step}: "
                                     + ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items()))
        return loss

    return loss_of, batch_size or DEMO_RECIPE["detector"]["batch_size"]


@torch.no_grad()
def evaluate_demo_detector(model: nn.Module, dataset, batch_size: int = 25) -> dict:
    """COCO metrics (fractions) of `model` on `dataset` ((uint8 image, target) items)."""
    from .evaluation import coco_evaluate

    model.eval()
    predictions, targets = [], []
    for k in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(k, min(len(dataset), k + batch_size))]
        predictions += model([im.float() / 255 for im, _ in items])
        targets += [t for _, t in items]
    model.train()
    return coco_evaluate(predictions, targets)


# --------------------------------------------------------------------------------------------
# Several seeds: python -m common.demo --script dap.py --seeds 0 1 2
# --------------------------------------------------------------------------------------------
SEEDS_BEGIN, SEEDS_END = "<!-- demo-seeds:begin -->", "<!-- demo-seeds:end -->"


def seeds_table(results: list[dict], command: str, machine: str, when: str) -> str:
    """The Markdown mean ± std table of several demo.json results of one script (one row per claim)."""
    seeds = [r["seed"] for r in results]
    lines = [f"Command: `{command}` at seeds {', '.join(map(str, seeds))}; {machine}; {when}.", "",
             "| claim | metric | better (paper) | worse (paper) | held | wall time per seed |",
             "| --- | --- | --- | --- | --- | --- |"]
    wall = np.array([r["wall_s"] for r in results])
    for k, c in enumerate(results[0]["claims"]):
        b = np.array([r["claims"][k]["better"]["value"] for r in results])
        w = np.array([r["claims"][k]["worse"]["value"] for r in results])
        held = int(sum(claim_holds(r["claims"][k]) for r in results))
        lines.append(f"| {c['claim']} | {c['metric']} | {c['better']['name']} {b.mean():.4f} ± {b.std(ddof=1) if len(b) > 1 else 0:.4f} "
                     f"| {c['worse']['name']} {w.mean():.4f} ± {w.std(ddof=1) if len(w) > 1 else 0:.4f} "
                     f"| {held} of {len(results)} seeds | {wall.mean() / 60:.1f} ± {wall.std() / 60:.1f} min |")
    lines += ["", "Per seed (better / worse):", ""]
    for r in results:
        lines.append(f"- seed {r['seed']} ({r['wall_s'] / 60:.1f} min): " + "; ".join(
            f"{c['metric']} {c['better']['value']:.4f} / {c['worse']['value']:.4f}" for c in r["claims"]))
    return "\n".join(lines)


def _update_results(path: Path, table: str) -> None:
    """Put `table` between the demo-seeds markers of `path` (appended when absent); the rest stays."""
    block = f"{SEEDS_BEGIN}\n{table}\n{SEEDS_END}"
    text = path.read_text() if path.is_file() else f"# {path.stem}\n"
    if SEEDS_BEGIN in text and SEEDS_END in text:
        head, rest = text.split(SEEDS_BEGIN, 1)
        text = head + block + rest.split(SEEDS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Demo at several seeds\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_seeds(script: str, seeds, out_root, extra=(), results_dir="results") -> str:
    """Run `python SCRIPT --demo --seed S --out OUT_ROOT/S` for each seed (one after the other: an
    idle machine gives honest wall times), then write the mean ± std table into
    `results_dir/<script stem>.md`. Returns the table."""
    import platform
    import subprocess
    import sys
    from datetime import datetime, timezone

    results = []
    for seed in seeds:
        out = Path(out_root) / str(seed)
        cmd = [sys.executable, script, "--demo", "--seed", str(seed), "--out", str(out), *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        obj = json.loads((out / "demo.json").read_text())
        check_demo_result(obj)
        results.append(obj)
    machine = f"{platform.machine()} {os.cpu_count()}-core {platform.processor() or platform.system()}, torch {torch.__version__}"
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = f"python {script} --demo --seed S --out {out_root}/S" + (" " + " ".join(extra) if extra else "")
    table = seeds_table(results, command, machine, when)
    _update_results(Path(results_dir) / f"{Path(script).stem}.md", table)
    print(table)
    return table


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Run a script's --demo at several seeds and write the mean ± std "
                                            "table into results/<script>.md")
    p.add_argument("--script", required=True, help="dap.py, jigsaw.py, soco.py, noisy_anchor.py, ...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/demo_seeds", help="each seed's demo writes OUT/<script>/<seed>/")
    p.add_argument("extra", nargs="*", help="more arguments for the script, after --")
    a = p.parse_args()
    run_seeds(a.script, a.seeds, Path(a.out) / Path(a.script).stem, a.extra)
