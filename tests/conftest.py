"""Shared test set-up: repository root on sys.path, few threads (CI has 2 cores), small fixtures."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture
def torchvision_hub(monkeypatch):
    """torchvision's weight download replaced: records which enum member was asked for and returns
    a ResNet state dict with a marker in conv1 (no network)."""
    from torchvision.models import resnet as tv_resnet
    from torchvision.models._api import WeightsEnum

    asked = []

    def get_state_dict(self, *args, **kwargs):
        asked.append(self)
        sd = getattr(tv_resnet, self.__class__.__name__.split("_")[0].lower())().state_dict()
        sd["conv1.weight"].fill_(0.25)
        return sd

    monkeypatch.setattr(WeightsEnum, "get_state_dict", get_state_dict)
    return asked


def run_torchrun(args, nproc=2, timeout=300, cwd=ROOT):
    """Run `python -m torch.distributed.run --standalone --nproc_per_node N <args>`; fail with its output."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *map(str, args)]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def record_autocast(monkeypatch, module) -> list:
    """Wrap `module.train_detector` so that every loss_fn call records the CPU autocast dtype in
    effect (None when autocast is off): the --amp tests check the script's steps ran in bfloat16."""
    from common.engine import default_loss

    seen, real = [], module.train_detector

    def train_detector(*args, loss_fn=None, **kwargs):
        inner = loss_fn or default_loss

        def spy(model, images, targets):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return inner(model, images, targets)

        return real(*args, loss_fn=spy, **kwargs)

    monkeypatch.setattr(module, "train_detector", train_detector)
    return seen
