"""Run by tests/test_engine.py under `torchrun --nproc_per_node 2` (gloo): two DDP training steps of
the shared engine, then distributed prediction; rank 0 writes what the test checks."""
import json
import sys

import torch

from common.data import build_loader, detection_transforms
from common.synthetic import SyntheticDetection
from common.detectors import build_detector
from common.distributed import all_gather_object, init_distributed, seed_everything, wrap_ddp
from common.engine import build_scheduler, train_detector
from common.evaluation import predict

out = sys.argv[1]
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
              open(f"{out}/ddp.json", "w"))
