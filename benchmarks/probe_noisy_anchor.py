# usage: python benchmarks/probe_noisy_anchor.py OUT --seed S [--arm NAME:key=value,key=value ...]
"""What do NoisyAnchor's cleanliness scores look like while the demo trains, and which variant of
the soft labels / re-weighting holds up? Runs `noisy_anchor.demo` at one seed in OUT (its warm-up
and finished arms are reused through --resume auto) with the arms given (always also the baseline
and the default `noisy_anchor`), and logs per 25 steps of each arm: mean loc_a, cls_c, c, the share
of positives with loc_a < 0.3, and the re-weighting's spread (max r, the largest anchor's share of
an image's r). Arm keys: the script's flags (soft_focal, soft_labels, reweight, assign, alpha),
`eps` (f(x) = 1 / (1 - x) clamped at x <= 1 - eps; the script's EPS is 1e-3), `batches` (the arm's
batch order: seed + batches; the demo's is 1, so `batches=2` is the same arm on another order of
the same training scenes), `like=baseline` (start from the baseline's flags) and `lr` (the arm's
peak learning rate; the demo's is --demo-arm-lr, 3e-4; the warm-up keeps common.demo's 1e-3). The
last line printed is a JSON object: every arm's AP / AP75 and its statistics averaged over the
arm's last 100 steps
(OUT/ARM/stats.jsonl counts a step as 8 images with positives, the demo's batch; an image without
positives adds no row, so its step numbers are approximate)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
import common.demo as CD  # noqa: E402
import noisy_anchor as NA  # noqa: E402
from common.distributed import init_distributed  # noqa: E402


def parse_arm(text: str):
    name, _, spec = text.partition(":")
    flags = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        flags[key] = {"true": True, "false": False}.get(value.lower(), value)
        if key in ("eps", "alpha", "lr"):
            flags[key] = float(value)
        if key == "batches":
            flags[key] = int(value)
    return name, flags


p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--arm", action="append", default=[], type=parse_arm)
a = p.parse_args()
torch.set_num_threads(1)

PROBE_KEYS = ("eps", "batches", "lr")
arms = {"baseline": NA.BASELINE_FLAGS, "noisy_anchor": {}}
for name, flags in a.arm:
    base = NA.BASELINE_FLAGS if flags.pop("like", None) == "baseline" else {}
    arms[name] = {**base, **{(f"probe_{k}" if k in PROBE_KEYS else k): v for k, v in flags.items()}}
NA.DEMO_ARMS = arms

current = {"name": "warmup", "eps": NA.EPS, "batches": 1, "lr": None}
stats: dict[str, list] = {}
_demo_model, _cleanliness, _reweight = NA.demo_model, NA.cleanliness, NA.reweight
_train_demo_detector = CD.train_demo_detector


def demo_model(num_classes, flags, pretrained=None):
    """The demo's model; notes which arm it is for (the most specific arm whose flags all match)."""
    matching = [(len(arm), name) for name, arm in arms.items() if all(getattr(flags, k, None) == v for k, v in arm.items())]
    current["name"] = max(matching)[1] if matching else "warmup"
    current["eps"] = getattr(flags, "probe_eps", NA.EPS)
    current["batches"] = getattr(flags, "probe_batches", 1)
    current["lr"] = getattr(flags, "probe_lr", None)
    return _demo_model(num_classes, flags, pretrained)


def train_demo_detector(model, dataset, steps, seed=0, **kw):
    """The demo's detector training; an arm trains on its `batches` order at its `lr` (the warm-up
    and the demo's own arms: batches 1 and no lr, so the call is the demo's unchanged)."""
    if current["lr"] is not None:
        kw["lr"] = current["lr"]
    return _train_demo_detector(model, dataset, steps, seed=seed - 1 + current["batches"], **kw)


def cleanliness(loc_a, cls_c, alpha=0.75):
    c = _cleanliness(loc_a, cls_c, alpha)
    if len(loc_a):
        stats.setdefault(current["name"], []).append(
            {"loc_a": loc_a.mean().item(), "cls_c": cls_c.mean().item(), "c": c.mean().item(),
             "low_iou": (loc_a < 0.3).float().mean().item(), "n_pos": len(loc_a)})
    return c


def reweight(loc_a, cls_c, alpha=0.75, gamma=1.0, eps=None):
    """Eq. 2.4 with the current arm's eps (the caller's is ignored), noting the spread of r."""
    r = _reweight(loc_a, cls_c, alpha, gamma, current["eps"])
    if len(r) and stats.get(current["name"]):
        stats[current["name"]][-1].update(r_max=r.max().item(), r_top_share=(r.max() / r.sum()).item())
    return r


def mean_rows(rows: list[dict]) -> dict:
    """Each statistic's mean over the rows that have it (r_* only where re-weighting is on)."""
    keys = sorted({k for r in rows for k in r})
    return {k: round(sum(r[k] for r in rows if k in r) / sum(k in r for r in rows), 4) for k in keys}


NA.demo_model, NA.cleanliness, NA.reweight = demo_model, cleanliness, reweight
CD.train_demo_detector = train_demo_detector
args = NA.parse_args(["--demo", "--seed", str(a.seed), "--out", a.out, "--resume", "auto"])
NA.demo(args, init_distributed(args.device))

tables = json.loads(Path(a.out, "demo.json").read_text())["tables"]
summary = {"seed": a.seed, "arms": {}}
for name, flags in arms.items():
    rows = stats.get(name, [])
    summary["arms"][name] = {"flags": flags, "AP": tables["ap"][name]["AP"], "AP75": tables["ap"][name]["AP75"],
                             **mean_rows(rows[-800:])}  # the last 100 steps of 8 images
    if rows:
        with open(Path(a.out, name, "stats.jsonl"), "w") as fh:
            for i in range(0, len(rows), 200):  # 25 steps of 8 images
                chunk = rows[i:i + 200]
                fh.write(json.dumps({"step": (i + len(chunk)) // 8, **mean_rows(chunk)}) + "\n")
print(json.dumps(summary))
