# usage: python benchmarks/probe_soco_transfer.py OUT --seed S [--epochs E] [--lr LR] [--steps N] [--ft-seeds F ...] [--pre-mode object|unlabeled] [--kind selective_search|whole] [--batch-size B] [--trust-coeff T] [--rows random soco rescaled backbone backbone_fpn backbone_head]
"""Why does the demo's fine-tuning from SoCo trail random init? Pre-trains SoCo at the demo's
settings and seed (OUT/, reused when there), prints how far pre-training moved each weight's norm
(SoCo / random init, per group), then fine-tunes the demo detector as the demo does from: random
init; SoCo (the demo's row); SoCo with every conv / fc weight rescaled to the norm the random init
gives that tensor (under BatchNorm a conv's scale changes nothing the network computes, only the
step size an optimiser's update has relative to it); SoCo's backbone alone (FPN and box head at
init); the backbone with the FPN; the backbone with the box head. Before fine-tuning it prints, per
FPN level, the effective rank and spatial contrast of the random and the SoCo pyramid's features on
held-out scenes. The last line printed is a JSON object."""
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
p.add_argument("--rows", nargs="*", default=None, help="the fine-tuning rows to run (default: all; none: statistics only)")
p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the demo's)")
p.add_argument("--lr", type=float, default=None, help="fine-tuning peak LR (default: common.demo's recipe)")
p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
p.add_argument("--ft-seeds", type=int, nargs="+", default=None,
               help="fine-tune every row once per seed given (the head's init and the batch order; the data stays "
                    "the demo's at --seed): the fine-tuning noise of a comparison (default: --seed only)")
p.add_argument("--pre-mode", choices=("object", "unlabeled"), default=None,
               help="pre-training images: object-centric (the demo's, ImageNet's role) or unlabelled scenes of the "
                    "fine-tuning domain (Tab. 9's COCO pre-training)")
p.add_argument("--kind", choices=("selective_search", "whole"), default="selective_search",
               help="pre-training proposals: SoCo's (default) or the whole image (image-level BYOL, Tab. 4 row 1)")
p.add_argument("--batch-size", type=int, default=None, help="pre-training batch (default: the demo's; the LR follows it)")
p.add_argument("--trust-coeff", type=float, default=None, help="pre-training LARS trust coefficient (default: the demo's)")
a = p.parse_args()
if a.pre_mode:
    soco.DEMO["pre_mode"] = a.pre_mode
torch.set_num_threads(1)
s, root = a.seed, Path(a.out)
budget = {"--epochs": a.epochs, "--batch-size": a.batch_size, "--trust-coeff": a.trust_coeff}  # soco's DEMO_FLAGS
args = soco.parse_args(["--demo", "--seed", str(s), "--out", str(root), "--resume", "auto",
                        *[x for flag, v in budget.items() if v for x in (flag, str(v))]])
d = soco.demo_settings(args)
ft_steps = a.steps or d["ft_steps"]
pre = soco.demo_pretrain_args(args, root, a.kind, 1000 * s + 1)
weights = Path(pre.out) / "soco_weights.pth"
if not weights.is_file():
    if a.kind == "selective_search":  # image-level BYOL reads no proposal table (as in soco.run_demo)
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


@torch.no_grad()
def pyramid_stats(state: dict, n: int = 100) -> dict:
    """Per FPN level (and the backbone's C5) on n held-out scenes (BN on batch statistics, as in fine-tuning): the effective
    rank of the 256 channels over all positions (exp of the entropy of the covariance's normalised
    eigenvalues; the channel count = every direction used) and the spatial contrast (std over positions / mean
    absolute value, per channel, averaged)."""
    torch.manual_seed(s)
    model = build_demo_detector(len(scenes.classes))
    model.load_state_dict(state)
    model.train()
    x = torch.stack([model.transform([test[i][0].float() / 255])[0].tensors[0] for i in range(n)])
    out = {}
    body = model.backbone.body(x)
    for level, f in {"C5": body["3"], **model.backbone.fpn(body)}.items():
        contrast = (f.std((2, 3)) / f.abs().mean((2, 3)).clamp(min=1e-8)).mean() if f[0, 0].numel() > 1 else None
        out[level] = {"eff_rank": round(soco.effective_rank(f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])), 1),
                      "contrast": None if contrast is None else round(float(contrast), 3)}  # None: a 1x1 level
    return out


stats = {"random init": pyramid_stats(rand), "SoCo": pyramid_stats(pret)}
print("FPN levels:", json.dumps(stats), flush=True)
clock = soco.StageClock()
ft_seeds = a.ft_seeds or [s]
rows = {ROWS[r][0] + ("" if len(ft_seeds) == 1 else f" (fine-tuning seed {f})"):
        soco.demo_finetune(*ROWS[r], train_set, test, ft_steps, f, clock, lr=a.lr)
        for f in ft_seeds for r in (ROWS if a.rows is None else a.rows)}
for name, m in rows.items():
    print(f"{name:<60} AP50 {100 * m['AP50']:5.1f}  AP {100 * m['AP']:5.1f}")
pretrain = {k: d[k] for k in ("pre_mode", "epochs", "batch_size", "trust_coeff")}
print(json.dumps({"seed": s, "pretrain": {**pretrain, "kind": a.kind}, "lr": a.lr, "steps": ft_steps,
                  "weight_norm_ratio": norms, "fpn_levels": stats,
                  "finetune": {n: {k: m[k] for k in ("AP50", "AP", "AP75")} for n, m in rows.items()}}))
