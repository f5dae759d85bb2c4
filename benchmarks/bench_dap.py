"""Benchmark of dap.py (prints figures; not a test).

1. Pseudo-box generation on the CPU (Step 2 end to end: resize to both scales, flip-averaged CAMs,
   boxes), a small backbone: images/s.
2. Box extraction alone (`cams_to_boxes`, Eq. 1-6 + NMS at 4 thresholds): time per CAM, batched and
   one map at a time, on smooth random maps of the 576-px grid (18 x 24 cells).
3. The pseudo-box table at ImageNet scale: a simulated 1.28M-image, 4.1M-box table is written once;
   then the time to open it (`PseudoBoxDataset`) and the memory of the main process plus W
   DataLoader workers while reading random items (RSS, and the private pages each worker adds:
   the table itself stays shared page cache).

    python benchmarks/bench_dap.py --images 1281167 --boxes 4100000 --workers 4
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dap  # noqa: E402
from benchmarks.bench_common import memory_kb, table_read_by_workers  # noqa: E402
from common.synthetic import SyntheticDetection  # noqa: E402
from common.detectors import build_classifier  # noqa: E402
from common.distributed import init_distributed  # noqa: E402


def bench_generation(images: int, side: int, scales, backbone: str, batch: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = build_classifier(backbone, 8)
        ckpt = Path(tmp) / "cls.pth"
        torch.save({"model": model.state_dict(), "args": {"backbone": backbone},
                    "classes": list(SyntheticDetection.classes)}, ckpt)
        args = dap.get_args_parser().parse_args([
            "pseudo-boxes", "--out", f"{tmp}/boxes", "--classifier", str(ckpt), "--scales", *map(str, scales),
            "--batch-size", str(batch), "--synthetic-images", str(images), "--image-size", str(side),
            "--workers", "0", "--device", "cpu"])
        t, c = time.perf_counter(), time.process_time()
        dap.generate_pseudo_boxes(args, init_distributed("cpu"))
        dt, dc = time.perf_counter() - t, time.process_time() - c
        print(f"pseudo-box generation, {backbone}, {side}-px images at scales {scales} + flip, batch {batch}, "
              f"{torch.get_num_threads()} threads: {images / dt:.1f} images/s wall-clock, "
              f"{images / dc:.1f} per CPU-second (includes the CorLoc pass)")


def bench_extraction(n: int, grid=(18, 24)) -> None:
    g = torch.Generator().manual_seed(0)
    cams = F.avg_pool2d(torch.rand(n, 1, *grid, generator=g), 5, 1, 2)[:, 0] + 0.1 * torch.rand(n, *grid, generator=g)
    dap.cams_to_boxes(cams[:2])
    t = time.perf_counter()
    boxes, _ = dap.cams_to_boxes(cams)
    batched = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for cam in cams[: min(n, 200)]:
        dap.cam_to_boxes(cam)
    single = (time.perf_counter() - t) / min(n, 200)
    print(f"box extraction ({grid[0]}x{grid[1]} CAM, 4 thresholds + NMS): {1e3 * batched:.3f} ms per CAM in a batch "
          f"of {n}, {1e3 * single:.3f} ms one at a time; {len(boxes) / n:.2f} boxes per CAM")


class _TinyImages(Dataset):
    """Stands in for ImageNet: a constant 8x8 image, so only the table's cost is measured."""

    def __init__(self, n):
        self.n, self.image = n, torch.zeros(3, 8, 8, dtype=torch.uint8)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.image, 0


def bench_table(images: int, boxes: int, workers: int, reads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        counts = rng.multinomial(boxes - images, np.full(images, 1 / images)) + 1  # >= 1 box per image
        xy = rng.uniform(0, 300, (boxes, 2)).astype(np.float32)
        image_labels = rng.integers(0, 1000, images).astype(np.int64)
        t = time.perf_counter()
        dap.pseudo_box_table(tmp).write(
            counts, {"classes": [str(c) for c in range(1000)]},
            boxes=np.concatenate([xy, xy + rng.uniform(10, 200, (boxes, 2)).astype(np.float32)], 1),
            labels=np.repeat(image_labels + 1, counts), image_ids=np.arange(images, dtype=np.int64),
            image_labels=image_labels, sizes=np.full((images, 2), 500, np.int32))
        size = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
        print(f"pseudo-box table: {images} images, {boxes} boxes, {size:.0f} MiB on disk "
              f"(written in {time.perf_counter() - t:.1f}s)")
        del xy, image_labels
        rss_before, _ = memory_kb()
        t = time.perf_counter()
        ds = dap.PseudoBoxDataset(tmp, _TinyImages(images))
        ds[0]
        print(f"  open (PseudoBoxDataset + first item): {1e3 * (time.perf_counter() - t):.1f} ms; main process RSS "
              f"+{(memory_kb()[0] - rss_before) / 1024:.1f} MiB")
        r = table_read_by_workers(ds, workers, reads)
        print(f"  {workers} workers x {reads} random items: {r['items_per_s']:.0f} items/s together; "
              f"worker RSS max {r['worker_rss_mib']:.0f} MiB (torch and the shared pages of the table included), "
              f"private pages added by reading max {r['private_mib']:.1f} MiB per worker; main process RSS "
              f"+{(memory_kb()[0] - rss_before) / 1024:.1f} MiB since before the open; wall {r['wall_s']:.1f}s")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1_281_167, help="simulated table size (ImageNet-1k train)")
    p.add_argument("--boxes", type=int, default=4_100_000, help="pseudo boxes in the table (Sec. 4.2: 4.1M)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--reads", type=int, default=20000, help="random items read by each worker")
    p.add_argument("--gen-images", type=int, default=64, help="0 skips the generation benchmark")
    p.add_argument("--gen-side", type=int, default=128)
    p.add_argument("--gen-scales", type=int, nargs="+", default=[288, 576], help="Sec. 4.1")
    p.add_argument("--gen-batch", type=int, default=16)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--cams", type=int, default=2000)
    a = p.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start (figures are wall-clock "
          f"unless marked)")
    bench_extraction(a.cams)
    if a.gen_images:
        bench_generation(a.gen_images, a.gen_side, a.gen_scales, a.backbone, a.gen_batch)
    bench_table(a.images, a.boxes, a.workers, a.reads)


if __name__ == "__main__":
    main()
