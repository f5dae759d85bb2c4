"""Benchmark of the shared package (prints figures; not a test).

1. COCO evaluation time of `common.evaluation.coco_evaluate` against plain pycocotools used the
   usual way (JSON-style dicts, `loadRes`, `summarize`) on a synthetic set of N images.
2. Data-loading throughput (images/s) of the synthetic and the COCO-format loaders with N workers.

`table_read_by_workers` (used by bench_dap.py and bench_soco.py): a memory-mapped
`common.table.RaggedTable`, or a dataset over one, read by W DataLoader workers at once.

    python benchmarks/bench_common.py --images 5000 --workers 0 2 4
"""
import argparse
import sys
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import build_detection_dataset, build_loader, detection_transforms  # noqa: E402
from common.synthetic import SyntheticDetection, export_coco  # noqa: E402
from common.evaluation import coco_evaluate  # noqa: E402


def fake_predictions(targets, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in targets:
        b = t["boxes"].astype(np.float64)
        extra = rng.uniform(0, 100, (6, 2))
        boxes = np.concatenate([b + rng.normal(0, 3, b.shape), np.concatenate([extra, extra + 20], 1)])
        out.append({"boxes": boxes, "scores": rng.random(len(boxes)),
                    "labels": np.concatenate([t["labels"], rng.integers(1, 9, 6)])})
    return out


def plain_pycocotools(predictions, targets):
    """pycocotools used the usual way: JSON-style dicts, loadRes, evaluate/accumulate/summarize.
    Returns `COCOeval.stats` (the tests use it as the reference for coco_evaluate)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (p, t) in enumerate(zip(predictions, targets), 1):
        images.append({"id": i})
        for b, c in zip(t["boxes"], t["labels"]):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "iscrowd": 0,
                         "bbox": [float(b[0]), float(b[1]), w, h], "area": w * h})
        for b, c, s in zip(p["boxes"], p["labels"], p["scores"]):
            dets.append({"image_id": i, "category_id": int(c), "score": float(s),
                         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]})
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": k} for k in range(1, 9)]}
    with redirect_stdout(StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def throughput(dataset, workers, batch, seconds_cap=20.0, max_batches=60):
    loader = build_loader(dataset, batch, train=True, workers=workers)
    it = iter(loader)
    next(it)  # workers started
    n, t0 = 0, time.perf_counter()
    for k, (images, _) in enumerate(it):
        n += len(images)
        if k + 1 >= max_batches or time.perf_counter() - t0 > seconds_cap:
            break
    return n / (time.perf_counter() - t0)


def memory_kb() -> tuple[int, int]:
    """(RSS, private pages) of this process in KiB, from /proc/self/smaps_rollup (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    kb = {k: int(v.split()[0]) for k, v in fields.items()}
    return kb["Rss"], kb["Private_Clean"] + kb["Private_Dirty"]


class _TableReader(Dataset):
    """Item w, read in worker w: item 0 of `dataset` (the table's memory maps open on first use in
    each worker), then `reads` random items; (first-item s, reads s, RSS KiB, private KiB added)."""

    def __init__(self, dataset, reads: int):
        self.dataset, self.reads = dataset, reads

    def __len__(self):
        return 1 << 30

    def __getitem__(self, w):
        _, private0 = memory_kb()
        t = time.perf_counter()
        self.dataset[0]
        first = time.perf_counter() - t
        t = time.perf_counter()
        for k in np.random.default_rng(w).integers(0, len(self.dataset), self.reads):
            self.dataset[int(k)]
        reads = time.perf_counter() - t
        rss, private = memory_kb()
        return first, reads, rss, private - private0


def table_read_by_workers(dataset, workers: int, reads: int) -> dict:
    """`workers` DataLoader workers, each reading `reads` random items of `dataset` (a memory-mapped
    table or a dataset over one; it reaches them pickled under spawn, forked otherwise). Returns
    items/s of all workers together, the slowest first item (the open) in ms, the largest worker
    RSS and private pages added by reading in MiB (the table itself stays shared page cache), and
    the wall-clock seconds."""
    import warnings

    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores
    loader = DataLoader(_TableReader(dataset, reads), batch_size=None, num_workers=workers, sampler=range(workers))
    t = time.perf_counter()
    first, secs, rss, private = zip(*loader)
    return {"items_per_s": sum(reads / s for s in secs), "first_item_ms": 1e3 * max(first),
            "worker_rss_mib": max(rss) / 1024, "private_mib": max(private) / 1024,
            "wall_s": time.perf_counter() - t}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000, help="images in the COCO-evaluation set")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--size", type=int, default=128, help="synthetic image side")
    args = p.parse_args()
    torch.set_num_threads(1)

    ds = SyntheticDetection(args.images, args.size, seed=0)
    t = time.perf_counter()
    targets = [ds.annotations(i) for i in range(len(ds))]
    print(f"built {len(targets)} synthetic ground truths in {time.perf_counter() - t:.1f} s")
    preds = fake_predictions(targets)
    timings = {}
    for backend in ("faster_coco_eval", "pycocotools"):
        t = time.perf_counter()
        timings[backend] = (coco_evaluate(preds, targets, backend=backend)["AP"], time.perf_counter() - t)
    t = time.perf_counter()
    ref = plain_pycocotools(preds, targets)[0]
    t_ref = time.perf_counter() - t
    print(f"COCO eval, {args.images} images, {sum(len(p['scores']) for p in preds)} detections:")
    for backend, (ap, sec) in timings.items():
        print(f"  coco_evaluate, {backend:16s}: {sec:6.2f} s  AP={ap:.4f}")
    print(f"  plain pycocotools (dicts, loadRes, summarize): {t_ref:6.2f} s  AP={ref:.4f}")

    tf = detection_transforms(True, scales=(args.size,), max_size=args.size * 2)
    with tempfile.TemporaryDirectory() as tmp:
        export_coco(SyntheticDetection(256, args.size, seed=1), tmp, "train")
        coco = build_detection_dataset(tmp, "train", transforms=tf)
        syn = SyntheticDetection(100_000, args.size, seed=2, transforms=tf)
        print(f"data loading, batch 8, {args.size} px, images/s:")
        for w in args.workers:
            print(f"  workers={w}: synthetic {throughput(syn, w, 8):7.1f}   COCO-format {throughput(coco, w, 8):7.1f}")


if __name__ == "__main__":
    main()
