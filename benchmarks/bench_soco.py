"""Benchmark of soco.py (prints figures; not a test).

1. Selective search (OpenCV-contrib, fast mode): images/s of one process, synthetic images of the
   given sides.
2. Proposal table at ImageNet scale: a simulated table of N images (default 1.28M) with B boxes per
   image is written once; then the time to open it and the memory that each of W DataLoader
   workers adds while reading random images (private pages from /proc/self/smaps_rollup).
3. SoCo pre-training on the CPU, a small configuration (ResNet-18 FPN + head, 112-px views):
   images/s and the share of each step spent waiting for data (common.engine's data_time).

    python benchmarks/bench_soco.py --images 1281167 --boxes-per-image 60 --workers 8
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import soco  # noqa: E402
from benchmarks.bench_common import table_read_by_workers  # noqa: E402
from common.synthetic import SyntheticDetection  # noqa: E402
from common.distributed import init_distributed  # noqa: E402


def bench_selective_search(sides, n: int = 8) -> None:
    import cv2

    cv2.setNumThreads(1)
    for side in sides:
        ds = SyntheticDetection(n, side, mode="unlabeled")
        images = [ds.render(i)[0] for i in range(n)]
        t, c = time.perf_counter(), time.process_time()
        boxes = [soco.selective_search(im, "fast") for im in images]
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"selective search (fast), {side}x{side}: {n / dt:.2f} images/s per process wall-clock, "
              f"{n / dc:.2f} per CPU-second ({np.mean([len(b) for b in boxes]):.0f} raw boxes per image)")


def bench_table(images: int, boxes_per_image: int, workers: int, reads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        counts = rng.poisson(boxes_per_image, images).clip(1, None)
        total = int(counts.sum())
        t = time.perf_counter()
        soco.proposal_table(root).write(counts, {"source": "simulated"},
                                        boxes=rng.integers(0, 500, (total, 4), dtype=np.uint16),
                                        sizes=np.full((images, 2), 500, np.int32))
        print(f"proposal table: {images} images, {total} boxes, "
              f"{sum(f.stat().st_size for f in root.iterdir()) / 2**20:.0f} MiB on disk "
              f"(written in {time.perf_counter() - t:.1f}s)")
        r = table_read_by_workers(soco.proposal_table(root), workers, reads)
        print(f"  {workers} workers: open + first image {r['first_item_ms']:.1f} ms (slowest), {reads} random images "
              f"each ({r['items_per_s']:.0f} images/s together); memory added per worker: max "
              f"{r['private_mib']:.1f} MiB private (the table itself is shared page cache); wall {r['wall_s']:.1f}s")


def bench_pretrain(steps: int, batch: int, workers: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--backbone", "resnet18", "--synthetic-images", str(batch * (steps + 1)), "--view-size", "112",
                "--v3-size", "56", "--batch-size", str(batch), "--workers", str(workers), "--device", "cpu",
                "--max-steps", str(steps), "--log-every", "1", "--checkpoint-every", "0",
                "--proposals", f"{tmp}/proposals", "--out", f"{tmp}/pre", "--ss-workers", "2", "--shard-size", "64"]
        args = soco.get_args_parser().parse_args(argv)
        soco.stage_proposals(soco.get_args_parser().parse_args(["proposals", *argv]))
        soco.stage_pretrain(args, init_distributed("cpu"))
        import json

        lines = [json.loads(l) for l in (Path(tmp) / "pre" / "metrics.jsonl").read_text().splitlines()][1:]
        data = np.array([l["data_time"] for l in lines])
        step = np.array([l["step_time"] for l in lines])
        print(f"SoCo pre-training, CPU ({torch.get_num_threads()} threads, {workers} loader workers), ResNet-18 "
              f"FPN + 4conv1fc, 112/112/56-px views, K=4, batch {batch}: {batch / (data + step).mean():.2f} "
              f"images/s; waiting for data {100 * data.sum() / (data + step).sum():.0f}% of the step "
              f"({len(lines)} steps after the first)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1_281_167, help="simulated table size (ImageNet-1k train)")
    p.add_argument("--boxes-per-image", type=int, default=60)
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers reading the table")
    p.add_argument("--reads", type=int, default=20000, help="random images read by each worker")
    p.add_argument("--ss-sides", type=int, nargs="+", default=[128, 224, 400])
    p.add_argument("--pretrain-steps", type=int, default=5)
    p.add_argument("--pretrain-batch", type=int, default=16)
    p.add_argument("--pretrain-workers", type=int, default=2)
    a = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (figures are wall-clock)")
    bench_selective_search(a.ss_sides)
    bench_table(a.images, a.boxes_per_image, a.workers, a.reads)
    bench_pretrain(a.pretrain_steps, a.pretrain_batch, a.pretrain_workers)


if __name__ == "__main__":
    main()
