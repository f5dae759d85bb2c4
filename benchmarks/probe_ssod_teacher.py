# usage: python benchmarks/probe_ssod_teacher.py OUT --seed S --steps N --head side-aware|regression [ssod_certainty flags ...]
"""How far is the demo's supervised detector from its plateau, and which box head learns faster?
One ssod_certainty teacher alone at the demo's settings (`ssod_certainty.DEMO_DEFAULTS`, from the
ImageNet stand-in), trained N steps (one full one-cycle run) on the labelled split with the
side-aware head (certainty-aware) or torchvision's regression head, scored on the validation
scenes. The last line printed is a JSON object (also OUT/teacher_result.json)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
import ssod_certainty as S  # noqa: E402
from common.demo import imagenet_standin  # noqa: E402
from common.distributed import init_distributed  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--head", choices=["side-aware", "regression"], default="side-aware")
a, extra = p.parse_known_args()
torch.set_num_threads(1)
args = S.parse_args(["--demo", "--seed", str(a.seed), "--out", a.out, *extra])
standin = imagenet_standin(args.seed, args.demo_backbone_steps, cache=args.synthetic_cache or "runs/synthetic_cache")
args = argparse.Namespace(**{**vars(args), "pretrained": standin["path"], "teacher_iters": a.steps,
                             "certainty_aware": a.head == "side-aware", "output_dir": a.out})
env = init_distributed(args.device)
labeled, _, val_set = S.build_datasets(args)
model = S.train_teacher(args, env, len(labeled.classes), labeled, Path(a.out) / "teacher")
m = S.evaluate(args, env, model, val_set, S.rarest_classes(labeled, args.num_rare), S.evaluation_metric(args.data))
res = {"seed": a.seed, "steps": a.steps, "head": a.head, "labeled_fraction": args.labeled_fraction,
       **{k: round(m[k], 4) for k in ("AP", "AP50", "AP75", "AP_rare")}}
(Path(a.out) / "teacher_result.json").write_text(json.dumps(res))
print(json.dumps(res))
