# usage: python benchmarks/probe_jigsaw.py OUT [--seed S] [--steps N] [--mode assembled|samples]
#                                          [--strategy blockwise|erf|global] [--scale LO HI] [--input-size PX] [--split PX]
"""Does the demo's Jigsaw pre-training learn, and do its samples carry their labels? On the demo's
sample table (`jigsaw.DEMO`'s scenes, Sec. 3.1) and a second table cut from held-out scenes:
  assembled: Jigsaw pre-training (`jigsaw.demo_pretrain`, 8 assembled images a step), then region
             accuracy on held-out assembled images (block-wise pooled fc argmax);
  samples:   the same samples classified one by one (each crop warped to 64 px, batch 32, common.demo's
             classifier optimiser), held-out sample accuracy.
The last line printed is a JSON object (also OUT/probe_<mode>.json)."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
import jigsaw as J  # noqa: E402
from common.demo import demo_optimizer, one_cycle  # noqa: E402
from common.detectors import build_classifier  # noqa: E402
from common.synthetic import SyntheticDetection  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("out")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--mode", choices=["assembled", "samples"], default="assembled")
p.add_argument("--strategy", choices=list(J.DEMO_STRATEGIES), default="blockwise")
p.add_argument("--scale", type=float, nargs=2, default=list(J.DEMO["scale_range"]))
p.add_argument("--input-size", type=int, default=160)
p.add_argument("--split", type=int, default=J.DEMO["split"], help="the template's cut (R1 is split x split px)")
a = p.parse_args()
torch.set_num_threads(1)
out = Path(a.out)
out.mkdir(parents=True, exist_ok=True)
train = SyntheticDetection(J.DEMO["train_scenes"], 64, seed=1000 * a.seed + 1, cache=out / "cache")
heldout = SyntheticDetection(200, 64, seed=1000 * a.seed + 2, cache=out / "cache")
for ds, name in ((train, "samples_train"), (heldout, "samples_heldout")):
    if not (out / name / "meta.json").is_file():
        J.extract_samples(ds, out / name, a.seed)
template = J.Template(a.input_size, a.split)
asm = {name: J.JigsawAssembly(ds, J.load_sample_table(out / name), template, "padcrop", a.scale)
       for ds, name in ((train, "samples_train"), (heldout, "samples_heldout"))}
classes = asm["samples_train"].classes
torch.manual_seed(a.seed)
net = build_classifier("resnet18", len(classes), norm="bn")
t0 = time.process_time()
if a.mode == "assembled":
    J.demo_pretrain(net, asm["samples_train"], a.strategy, a.steps, J.DEMO["pretrain_batch"], a.seed)
    net.eval()
    rop, correct, total = template.region_of_position(), 0, 0
    torch.manual_seed(123)
    with torch.no_grad():
        for _ in range(25):  # 200 held-out assembled images, 800 regions
            items = [asm["samples_heldout"][0] for _ in range(8)]
            x = torch.stack([i[0] for i in items])
            y = torch.stack([i[1]["region_labels"] for i in items])
            correct += (net.fc(J.region_pool(J.backbone_features(net, x), rop)).argmax(-1) == y).sum().item()
            total += y.numel()
    acc = correct / total
else:
    def warped(assembly):
        mean, std = torch.tensor(J.MEAN)[:, None, None], torch.tensor(J.STD)[:, None, None]
        x = torch.stack([F.interpolate(assembly.crop(k)[None].float() / 255, size=(64, 64), mode="bilinear",
                                       antialias=True)[0] for k in range(len(assembly.labels))])
        return (x - mean) / std, torch.as_tensor(assembly.labels).long()
    xt, yt = warped(asm["samples_train"])
    xv, yv = warped(asm["samples_heldout"])
    opt = demo_optimizer(net.parameters(), "classifier")
    sched = one_cycle(opt, a.steps, max(1, a.steps // 4))
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(yt), (32,))
        x = xt[idx].flip(-1) if torch.rand(()) < 0.5 else xt[idx]
        loss = F.cross_entropy(net(x), yt[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"samples step {step}/{a.steps} loss {loss.item():.3f}", flush=True)
    net.eval()
    with torch.no_grad():
        acc = (torch.cat([net(xv[i:i + 256]).argmax(1) for i in range(0, len(yv), 256)]) == yv).float().mean().item()
labels = torch.as_tensor(asm["samples_heldout"].labels).long()
res = {"mode": a.mode, "strategy": a.strategy if a.mode == "assembled" else None, "scale": a.scale,
       "input_size": a.input_size, "split": a.split, "steps": a.steps, "seed": a.seed, "heldout_accuracy": round(acc, 4),
       "commonest_class_share": round(torch.bincount(labels).max().item() / len(labels), 4),
       "cpu_s": round(time.process_time() - t0, 1)}
(out / f"probe_{a.mode}.json").write_text(json.dumps(res))
print(json.dumps(res))
