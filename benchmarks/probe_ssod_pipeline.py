# usage: python benchmarks/probe_ssod_pipeline.py OUT --seed S --pipeline plain|ours|ca_only
#            [--teacher-iters N --student-iters M --teacher PATH ...: any ssod_certainty flag]
"""One pipeline of the ssod_certainty demo (teacher, then student) at other step counts, so that the
demo's two pipelines can run side by side, one process per core, and a variant can start from a
saved teacher (`--teacher OUT/ours/teacher/checkpoint.pth`). The demo's settings
(`ssod_certainty.DEMO_DEFAULTS`, from the ImageNet stand-in) under any flag given; pipelines:
  plain    the regression head, pseudo labels where p >= tau (Table 3.4, row 1)
  ours     CA + RE + DT (Table 3.4, last row)
  ca_only  CA alone: the side-aware head, p * v >= tau, no re-weighting, no dynamic thresholds
Writes OUT/<pipeline>/ as `ssod_certainty.run` does; the last line printed is a JSON object."""
import argparse
import json
import sys

import torch

sys.path.insert(0, ".")
import ssod_certainty as S  # noqa: E402
from common.demo import imagenet_standin  # noqa: E402
from common.distributed import init_distributed  # noqa: E402

PIPELINES = {"plain": dict(certainty_aware=False, reweight=False, dynamic_threshold=False),
             "ours": {}, "ca_only": dict(reweight=False, dynamic_threshold=False)}
p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--pipeline", choices=list(PIPELINES), default="ours")
a, extra = p.parse_known_args()
torch.set_num_threads(1)
args = S.parse_args(["--demo", "--seed", str(a.seed), "--output-dir", a.out, *extra])
standin = imagenet_standin(args.seed, args.demo_backbone_steps, cache=args.synthetic_cache or "runs/synthetic_cache")
args = argparse.Namespace(**{**vars(args), "pretrained": standin["path"], **PIPELINES[a.pipeline],
                             "output_dir": f"{a.out}/{a.pipeline}"})
r = S.run(args, init_distributed(args.device))
res = {"seed": a.seed, "pipeline": a.pipeline, "teacher": args.teacher or f"{args.teacher_iters} steps",
       "student_iters": args.student_iters,
       **{f"{k}_{m}": round(r[k][m], 4) for k in ("teacher", "student") for m in ("AP", "AP50", "AP75", "AP_rare")}}
print(json.dumps(res))
