"""Run by tests/test_engine.py under `torchrun --nproc_per_node 2` (gloo): two DDP training steps of
the shared engine, then distributed prediction; then 6 steps straight against 3 steps and a resume
of the last 3 from that run's checkpoint (mid-epoch). Each rank draws its own random numbers (RPN /
RoI sampling depends on its images), so only a checkpoint holding every rank's RNG state resumes
exactly. Rank 0 writes what the tests check."""
import json
import sys
from pathlib import Path

import torch

from common.data import build_loader, detection_transforms
from common.synthetic import SyntheticDetection
from common.detectors import build_detector
from common.distributed import all_gather_object, init_distributed, seed_everything, wrap_ddp
from common.engine import build_scheduler, train_detector
from common.evaluation import predict

out = Path(sys.argv[1])
env = init_distributed("cpu")
seed_everything(0)
model = build_detector("faster_rcnn_fpn", 8, backbone="resnet18", min_size=64, max_size=96,
                       anchor_sizes=(16, 32, 64, 128, 256), rpn_batch_size_per_image=32,
                       box_batch_size_per_image=32, rpn_post_nms_top_n_test=50, box_detections_per_img=10)
model = wrap_ddp(model, env)
train = SyntheticDetection(8, 64, transforms=detection_transforms(True, scales=(64,), max_size=96))
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
train_detector(model, build_loader(train, 2, True, workers=0), opt, build_scheduler(opt, 2), epochs=1,
               out_dir=out, max_steps=2, log_every=1)
weights = torch.cat([p.detach().flatten() for p in model.parameters()])
checksums = all_gather_object(float(weights.double().sum()))
val = SyntheticDetection(5, 64, seed=9, transforms=detection_transforms(False))  # 5: uneven over 2 ranks
preds, targets = predict(model.module, build_loader(val, 2, False, workers=0), env.device)
if env.rank == 0:
    json.dump({"checksums": checksums, "n_preds": len(preds),
               "ids": [int(t["image_id"]) for t in targets], "world": env.world_size},
              open(out / "ddp.json", "w"))


def run(folder, max_steps=None, resume=None):
    seed_everything(0)
    model = build_detector("faster_rcnn_fpn", 8, backbone="resnet18", min_size=64, max_size=96,
                           anchor_sizes=(16, 32, 64, 128, 256), rpn_batch_size_per_image=32,
                           box_batch_size_per_image=32)
    model = wrap_ddp(model, env)
    train = SyntheticDetection(8, 64, transforms=detection_transforms(True, scales=(48, 64), max_size=96))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    loader = build_loader(train, 1, True, workers=0)  # 4 steps per epoch on each rank
    train_detector(model, loader, opt, build_scheduler(opt, 6, warmup_steps=2), epochs=2, out_dir=folder,
                   max_steps=max_steps or 6, checkpoint_every=1, resume=resume, log_every=1)
    return model.module.state_dict()


full = run(out / "full")
run(out / "part", max_steps=3)  # stopped in the middle of epoch 0
resumed = run(out / "part", resume=out / "part" / "checkpoint.pth")
if env.rank == 0:
    differ = [k for k in full if not torch.equal(full[k], resumed[k])]
    json.dump({"tensors": len(full), "differ": differ,
               "max_diff": max((float((full[k] - resumed[k]).abs().max()) for k in differ), default=0.0)},
              open(out / "resume.json", "w"))
