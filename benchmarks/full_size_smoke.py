"""Every script's training step at the papers' full size, a few iterations, on whatever device is here.

For a GPU machine lent for minutes: one command, no files needed (synthetic data rendered at the
size the paper trains at), no network (a random ResNet-50 saved here stands in for ImageNet
weights). Each entry runs in its own process (a crash or an out-of-memory in one does not stop
the others) through the script's own command line, with `--amp`, and reports from the
`metrics.jsonl` that `common.engine` writes: the median step time after the first step, the
share of the step spent waiting for data (`data_time / (data_time + step_time)`), and the peak
memory (CUDA: `torch.cuda.max_memory_allocated`; CPU: the process's peak RSS).

| entry | what runs (full size) | per-device batch |
| --- | --- | --- |
| soco | SoCo pre-training, R50-FPN + 4conv1fc head, V1/V2 224, V3 112, K=4 (random boxes: selective search is offline) | 256 (2048 on 8 GPUs) |
| jigsaw | Jigsaw pre-training, ResNet-50, 224 assembled images, ERF-adaptive loss | 64 (512 on 8 GPUs) |
| ssod | the certainty-aware student, Faster R-CNN R50-FPN at 800 / 1333 (a 1-step teacher first) | 2 (the thesis' 8 on 4 GPUs) |
| dap | Step 3 detector pre-training on CAM pseudo boxes (after a 1-epoch Step 1 and Step 2), R50-FPN, 96-640 | 4 (32 on 8 GPUs) |
| noisy_anchor | RetinaNet R50-FPN at 800 / 1333 with the noisy-anchor loss | 2 (16 on 8 GPUs) |

Synthetic rendering costs more CPU than decoding a JPEG, so the data share is an upper bound
(`benchmarks/bench_pipelines.py` measures the real-format pipelines). The last line is one JSON
object: {entry: {"step_s", "data_share", "peak_mem_gib", "device", "batch", "steps"} or
{"error": ...}}; the exit status is 1 when an entry failed.

    python benchmarks/full_size_smoke.py                       # GPU machine: every entry, 4 steps
    python benchmarks/full_size_smoke.py --only soco --steps 6 --workers 12
    python benchmarks/full_size_smoke.py --reduced --steps 1   # CPU check (tests/test_full_size_smoke.py)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = ("soco", "jigsaw", "ssod", "dap", "noisy_anchor")


def plan(name: str, out: Path, steps: int, workers: int, reduced: bool, batch: int | None, weights: Path):
    """[(script, argv)] run in order, and the metrics.jsonl of the step measured. `reduced`: a CPU
    check of the same code paths (ResNet-18, small sizes, batch 2)."""
    bb = "resnet18" if reduced else "resnet50"
    w, s, amp = str(workers), str(steps), ["--amp"]
    log = ["--log-every", "1"]
    if name == "soco":
        b = batch or (2 if reduced else 256)
        view, v3, side = ("64", "32", "64") if reduced else ("224", "112", "224")
        argv = ["--backbone", bb, "--view-size", view, "--v3-size", v3, "--batch-size", str(b),
                "--proposals-kind", "random", "--synthetic-images", str(b * (steps + 1)), "--image-size", side,
                "--max-steps", s, "--checkpoint-every", "0", "--workers", w, "--out", str(out), *log, *amp]
        if reduced:
            argv += ["--proj-hidden", "64", "--proj-dim", "32"]
        return [("soco.py", argv)], out / "metrics.jsonl", b
    if name == "jigsaw":
        b = batch or (2 if reduced else 64)
        size, split, side, n = ("64", "32", "96", 16) if reduced else ("224", "64", "320", max(64, b * (steps + 1)))
        argv = ["--stage", "pretrain", "--backbone", bb, "--input-size", size, "--split", split,
                "--batch-size", str(b), "--iters", s, "--warmup-iters", "1", "--num-images", str(n),
                "--image-size", side, "--erf-images", "2" if reduced else "16", "--checkpoint-every", "0",
                "--workers", w, "--out", str(out), *log, *amp]
        return [("jigsaw.py", argv)], out / "pretrain" / "metrics.jsonl", b
    if name in ("ssod", "noisy_anchor"):
        b = batch or 2
        scale, cap, side = ("96", "128", "96") if reduced else ("800", "1333", "800")
        common = ["--backbone", bb, "--pretrained", str(weights), "--train-scales", scale, "--min-size", scale,
                  "--max-size", cap, "--batch-size", str(b), "--synthetic-train", str(max(8, 2 * b * (steps + 1))),
                  "--synthetic-val", "2", "--synthetic-size", side, "--workers", w, "--output-dir", str(out),
                  *log, *amp]
        if name == "ssod":
            argv = common + ["--teacher-iters", "1", "--student-iters", s, "--labeled-fraction", "0.5",
                             "--heldout-images", "0", "--warmup-iters", "1"]
            if reduced:
                argv += ["--proposals", "64", "--roi-batch", "32"]
            return [("ssod_certainty.py", argv)], out / "student" / "metrics.jsonl", b
        argv = common + ["--iters", s, "--warmup-iters", "1"]
        return [("noisy_anchor.py", argv)], None, b
    if name == "dap":
        b = batch or (2 if reduced else 4)
        side = "96" if reduced else "500"
        n = str(max(4, b * steps))  # Step 3 runs one epoch: n / b iterations
        data = ["--synthetic-images", n, "--image-size", side, "--workers", w, *amp]
        cls = ["classify", "--backbone", bb, "--epochs", "1", "--batch-size", "4", "--crop-size",
               "64" if reduced else "224", "--out", str(out / "cls"), *data]
        boxes = ["pseudo-boxes", "--classifier", str(out / "cls" / "classifier.pth"), "--batch-size", "4",
                 "--out", str(out / "boxes"), *data] + (["--scales", "48", "96"] if reduced else [])
        det = ["pretrain", "--backbone", bb, "--pseudo-boxes", str(out / "boxes"), "--classifier",
               str(out / "cls" / "classifier.pth"), "--batch-size", str(b), "--epochs", "1", "--warmup-iters", "1",
               "--out", str(out / "det"), *data]
        if reduced:
            det += ["--scales", "64", "96", "--max-size", "128", "--proposals", "64", "32", "--roi-batch", "32"]
        return [("dap.py", cls), ("dap.py", boxes), ("dap.py", det)], out / "det" / "metrics.jsonl", b
    raise KeyError(name)


def random_resnet50(path: Path, backbone: str) -> Path:
    """A random ImageNet-shaped ResNet state dict: the stand-in for `--pretrained torchvision` (no network)."""
    import torch
    import torchvision

    if not path.is_file():
        torch.manual_seed(0)
        torch.save(getattr(torchvision.models, backbone)().state_dict(), path)
    return path


def child(script: str, argv: list[str]) -> None:
    """Run one script's main in this process (what `python script argv` does), then print its peak memory."""
    import runpy

    import torch

    sys.argv = [script, *argv]
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    runpy.run_path(str(ROOT / script), run_name="__main__")
    if torch.cuda.is_available():
        peak, device = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.get_device_name()
    else:
        peak, device = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu"
    print("SMOKE_CHILD " + json.dumps({"peak_mem_gib": round(peak, 2), "device": device}), flush=True)


def read_metrics(path: Path) -> dict:
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    lines = [l for l in lines if "step_time" in l]
    if not lines:
        raise RuntimeError(f"{path} holds no step")
    timed = lines[1:] or lines  # the first step warms up (allocator, cuDNN autotuning, workers)
    step = [l["step_time"] for l in timed]
    data = [l["data_time"] for l in timed]
    return {"step_s": round(statistics.median(step), 4),
            "data_share": round(sum(data) / (sum(data) + sum(step)), 3), "steps": len(lines)}


def run_entry(name: str, out: Path, a) -> dict:
    weights = random_resnet50(out.parent / f"{a.backbone_weights}.pth", a.backbone_weights)
    stages, metrics, batch = plan(name, out, a.steps, a.workers, a.reduced, a.batch.get(name), weights)
    peak = {}
    t = time.perf_counter()
    for script, argv in stages:
        cmd = [sys.executable, __file__, "--child", script, "--", *argv]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        (out.parent / f"{name}.log").open("a").write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"error": f"{script} {argv[0]} exited {proc.returncode}: {' | '.join(tail)}"}
        found = [l for l in proc.stdout.splitlines() if l.startswith("SMOKE_CHILD ")]
        peak = json.loads(found[-1][len("SMOKE_CHILD "):]) if found else {}
    if metrics is None:  # the script picks its own run folder under --output-dir
        metrics = max(out.rglob("metrics.jsonl"), key=lambda p: p.stat().st_mtime)
    return {**read_metrics(metrics), **peak, "batch": batch, "wall_s": round(time.perf_counter() - t, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=list(ENTRIES), choices=ENTRIES)
    p.add_argument("--steps", type=int, default=4, help="training iterations per entry (the first is not timed)")
    p.add_argument("--workers", type=int, default=min(12, max(0, (os.cpu_count() or 1) - 2)),
                   help="DataLoader workers per entry")
    p.add_argument("--batch", nargs="*", default=[], metavar="ENTRY=B", help="override an entry's per-device batch")
    p.add_argument("--reduced", action="store_true", help="CPU check: ResNet-18, small sizes, batch 2")
    p.add_argument("--out", default="", help="keep the runs here (default: a temporary folder)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per stage before it counts as failed")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.rest[1:] if a.rest[:1] == ["--"] else a.rest)
        return {}
    a.batch = {k: int(v) for k, v in (x.split("=", 1) for x in a.batch)}
    a.backbone_weights = "resnet18" if a.reduced else "resnet50"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.out or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name in a.only:
            out = root / name
            if out.exists():
                raise FileExistsError(f"{out} exists (a run's folder is never reused): pass another --out")
            try:
                results[name] = run_entry(name, out, a)
            except Exception as e:  # noqa: BLE001 - report and go on to the next entry
                results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {results[name]}", flush=True)
            if a.out:  # what is done survives a kill of the whole command
                (root / "smoke.json").write_text(json.dumps(results))
    print(json.dumps(results))
    if any("error" in r for r in results.values()):
        sys.exit(1)
    return results


if __name__ == "__main__":
    main()
