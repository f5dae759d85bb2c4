# usage: python benchmarks/probe_soco_transfer.py OUT --seed S [--rows random soco rescaled backbone backbone_fpn backbone_head]
"""Why does the demo's fine-tuning from SoCo trail random init? Pre-trains SoCo at the demo's
settings and seed (OUT/, reused when there), prints how far pre-training moved each weight's norm
(SoCo / random init, per group), then fine-tunes the demo detector as the demo does from: random
init; SoCo (the demo's row); SoCo with every conv / fc weight rescaled to the norm the random init
gives that tensor (under BatchNorm a conv's scale changes nothing the network computes, only the
step size an optimiser's update has relative to it); SoCo's backbone alone (FPN and box head at
init); the backbone with the FPN; the backbone with the box head. The last line printed is a JSON
object."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
import soco  # noqa: E402
from common.data import fraction_split, subset_by_ids  # noqa: E402
from common.demo import DEMO_RECIPE, build_demo_detector  # noqa: E402
from common.detectors import load_weights  # noqa: E402
from common.distributed import init_distributed  # noqa: E402
from common.synthetic import SyntheticDetection  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--rows", nargs="+", default=None, help="the fine-tuning rows to run (default: all)")
a = p.parse_args()
torch.set_num_threads(1)
s, root = a.seed, Path(a.out)
args = soco.parse_args(["--demo", "--seed", str(s), "--out", str(root), "--resume", "auto"])
d = soco.demo_settings(args)
pre = soco.demo_pretrain_args(args, root, "selective_search", 1000 * s + 1)
weights = Path(pre.out) / "soco_weights.pth"
if not weights.is_file():
    soco.stage_proposals(pre)
    soco.stage_pretrain(pre, init_distributed("cpu"))

size = DEMO_RECIPE["scene_size"]
scenes = SyntheticDetection(d["scenes"], size, mode="scenes", seed=1000 * s + 3)
test = SyntheticDetection(d["test_scenes"], size, mode="scenes", seed=1000 * s + 4)
train_set = subset_by_ids(scenes, fraction_split(scenes, d["fraction"], seed=s)[0])


def detector(w=None):
    torch.manual_seed(s)  # demo_finetune's init
    model = soco.align_roi_pooling(build_demo_detector(len(scenes.classes)), soco.DEMO_BOX_HEAD["roi_sampling_ratio"])
    if w is not None:
        load_weights(model, w, verbose=False)
    return model.state_dict()


rand, pret = detector(), detector(weights)
moved = [k for k in rand if rand[k].dim() >= 2 and k.startswith(("backbone", "roi_heads.box_head"))
         and not torch.equal(rand[k], pret[k])]
groups = {"backbone.body": [], "backbone.fpn": [], "roi_heads.box_head": []}
for k in moved:
    groups[next(g for g in groups if k.startswith(g))].append((pret[k].norm() / rand[k].norm()).item())
norms = {g: {"median": round(float(torch.tensor(v).median()), 3), "min": round(min(v), 3), "max": round(max(v), 3),
             "tensors": len(v)} for g, v in groups.items() if v}
print("weight norm, SoCo / random init:", json.dumps(norms), flush=True)
rescaled = {k: (v * (rand[k].norm() / v.norm()) if k in moved else v) for k, v in pret.items()}


def only(*prefixes):
    """SoCo's tensors under `prefixes`, the random init's elsewhere."""
    return {k: (v if k.startswith(prefixes) else rand[k]) for k, v in pret.items()}


ROWS = {"random": ("random init", None), "soco": ("SoCo", weights),
        "rescaled": ("SoCo, norms rescaled to random init's", rescaled),
        "backbone": ("SoCo backbone only", only("backbone.body")),
        "backbone_fpn": ("SoCo backbone + FPN", only("backbone.body", "backbone.fpn")),
        "backbone_head": ("SoCo backbone + box head", only("backbone.body", "roi_heads.box_head"))}
clock = soco.StageClock()
rows = {ROWS[r][0]: soco.demo_finetune(*ROWS[r], train_set, test, d["ft_steps"], s, clock) for r in (a.rows or ROWS)}
for name, m in rows.items():
    print(f"{name:<40} AP50 {100 * m['AP50']:5.1f}  AP {100 * m['AP']:5.1f}")
print(json.dumps({"seed": s, "weight_norm_ratio": norms,
                  "finetune": {n: {k: m[k] for k in ("AP50", "AP", "AP75")} for n, m in rows.items()}}))
