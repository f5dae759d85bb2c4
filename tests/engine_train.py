"""A small model trained by the shared engine, for tests/test_engine.py: imported for the in-process
tests of checkpoints and logs, and run as a real training process by the kill test:
`python engine_train.py OUT [--resume auto] [--workers N] [--hang-at STEP]`. Every step draws random
numbers in the loader workers (each item's points, as an augmentation would) and in the main
process (dropout); 2 epochs of 4 steps, a checkpoint every step. `--hang-at` blocks after that
step's update (before its checkpoint) until the test SIGKILLs the process. Final weights: OUT/final.pth."""
import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common.data import build_loader
from common.distributed import seed_everything
from common.engine import build_scheduler, resolve_resume, save_checkpoint, train_detector


class Points(torch.utils.data.Dataset):
    """16 random points (drawn from the item's seed, which common.data.SeededDataset sets) labelled i % 2."""

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randn(4), {"y": torch.tensor(i % 2)}


def loss_ce(model, images, targets) -> dict:
    return {"loss_ce": F.cross_entropy(model(torch.stack(images)), torch.stack([t["y"] for t in targets]))}


def train(out, resume=None, max_steps=None, frozen=False, amp=False, loss_fn=loss_ce, workers=0, **kw):
    """8 steps (2 epochs of 4) of a 2-layer net with dropout; warm-up 0.1 -> 1 of LR 0.1 over 4 steps."""
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model[0].requires_grad_(not frozen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    sched = build_scheduler(opt, 8, warmup_steps=4, warmup_factor=0.1)
    train_detector(model, build_loader(Points(), 4, True, workers=workers), opt, sched, epochs=2, out_dir=out,
                   args={"frozen": frozen}, loss_fn=loss_fn, amp=amp, resume=resume, max_steps=max_steps,
                   log_every=1, **kw)
    return model


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--resume", default="")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hang-at", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)

    def hang(step):
        if step == args.hang_at:
            (out / "hanging").write_text(str(step))
            time.sleep(600)

    model = train(out, resolve_resume(args.resume, out), workers=args.workers, checkpoint_every=1, on_step_end=hang)
    save_checkpoint(out / "final.pth", {"model": model.state_dict()})
