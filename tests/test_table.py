"""common.table: round trip, sharded writes merged in order, atomic (re)writes, clear errors, and a
pickle (what a DataLoader worker receives) that carries no array."""
import os
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.table import RaggedTable


def boxes_table(root):
    return RaggedTable(root, rows=("boxes", "labels"), images=("sizes",), what="box table",
                       hint="run `make_boxes` first")


def random_rows(n_images, rng, max_rows=4):
    counts = rng.integers(0, max_rows + 1, n_images)  # images without rows too
    counts[0] = 2
    m = int(counts.sum())
    return counts, {"boxes": rng.uniform(0, 100, (m, 4)).astype(np.float32),
                    "labels": rng.integers(1, 9, m).astype(np.int64),
                    "sizes": rng.integers(10, 500, (n_images, 2)).astype(np.int32)}


def test_round_trip_memory_mapped(tmp_path):
    counts, arrays = random_rows(7, np.random.default_rng(0))
    boxes_table(tmp_path).write(counts, {"source": "x"}, **arrays)
    table = boxes_table(tmp_path)
    assert table.complete and len(table) == 7
    assert table.meta == {"source": "x", "num_images": 7, "num_boxes": int(counts.sum())}
    assert all(isinstance(a, np.memmap) for a in table.arrays.values())
    assert table.arrays["offsets"].tolist() == [0, *np.cumsum(counts).tolist()]
    start = 0
    for k, n in enumerate(counts):
        rows = table[k]
        assert set(rows) == {"boxes", "labels"} and not isinstance(rows["boxes"], np.memmap)
        assert np.array_equal(rows["boxes"], arrays["boxes"][start:start + n])
        assert np.array_equal(rows["labels"], arrays["labels"][start:start + n])
        start += n
    assert np.array_equal(table.arrays["sizes"], arrays["sizes"])


def test_pickle_carries_no_array_and_a_spawned_worker_reads_the_same_rows(tmp_path):
    rng = np.random.default_rng(1)
    counts = np.full(1000, 10)  # 10,000 rows: 200 KB of arrays
    arrays = {"boxes": rng.uniform(0, 100, (10_000, 4)).astype(np.float32),
              "labels": rng.integers(1, 9, 10_000), "sizes": np.full((1000, 2), 64, np.int32)}
    boxes_table(tmp_path).write(counts, {"source": "x"}, **arrays)
    table = boxes_table(tmp_path)
    table[3]  # the maps are open in this process now
    assert table._arrays is not None
    blob = pickle.dumps(table)
    assert len(blob) < 2_000, len(blob)
    again = pickle.loads(blob)
    assert again._arrays is None and np.array_equal(again[999]["boxes"], table[999]["boxes"])
    wanted = [0, 17, 999]
    loader = DataLoader(table, batch_size=None, sampler=wanted, num_workers=1, multiprocessing_context="spawn")
    for k, rows in zip(wanted, loader):  # read in a worker that got the table by pickle
        assert torch.equal(rows["boxes"], torch.from_numpy(table[k]["boxes"]))
        assert torch.equal(rows["labels"], torch.from_numpy(table[k]["labels"]))


def test_shards_from_two_ranks_merge_in_index_order(tmp_path):
    rng = np.random.default_rng(2)
    parts = [random_rows(n, rng) for n in (3, 5, 2)]
    table = boxes_table(tmp_path)
    for index in (1, 0):  # rank 1 and rank 0 finish in any order; shard 2 still running
        table.write_shard(index, parts[index][0], **parts[index][1])
    assert table.missing_shards(3) == [2] and not table.complete
    with pytest.raises(FileNotFoundError, match=r"shards \[2\] of 3"):
        table.merge_shards(3, {})
    assert not list((tmp_path / "shards").glob(".*"))  # no temporary file is left behind
    table.write_shard(2, parts[2][0], **parts[2][1])
    table.merge_shards(3, {"source": "x"}, keep_shards=True)
    assert len(table) == 10 and table.shard_path(0).is_file()
    whole = {k: np.concatenate([p[1][k] for p in parts]) for k in ("boxes", "labels", "sizes")}
    for k, v in whole.items():
        assert np.array_equal(table.arrays[k], v), k
    assert np.array_equal(np.diff(table.arrays["offsets"]), np.concatenate([p[0] for p in parts]))
    table.merge_shards(3, {"source": "x"})  # again, now deleting the shards
    assert not (tmp_path / "shards").exists() and len(boxes_table(tmp_path)) == 10


def test_a_write_killed_half_way_leaves_an_incomplete_table(tmp_path, monkeypatch):
    counts, arrays = random_rows(4, np.random.default_rng(3))
    boxes_table(tmp_path).write(counts, {"source": "old"}, **arrays)
    calls, real = [], os.replace

    def dies_on_the_third(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed while rewriting the arrays
        real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        boxes_table(tmp_path).write(counts, {"source": "new"}, **arrays)
    monkeypatch.undo()
    assert not boxes_table(tmp_path).complete  # never a mix of old and new arrays that looks complete
    with pytest.raises(FileNotFoundError, match="no complete box table .*run `make_boxes` first"):
        len(boxes_table(tmp_path))


def test_bad_input_names_the_problem(tmp_path):
    counts, arrays = random_rows(4, np.random.default_rng(4))
    with pytest.raises(ValueError, match="do not match the schema"):
        boxes_table(tmp_path).write(counts, {}, boxes=arrays["boxes"])
    with pytest.raises(ValueError, match="sizes has 3 entries, expected 4"):
        boxes_table(tmp_path).write(counts, {}, **dict(arrays, sizes=arrays["sizes"][:3]))
    boxes_table(tmp_path).write(counts, {}, **arrays)
    np.save(tmp_path / "labels.npy", arrays["labels"][:-1])  # a file replaced by hand
    with pytest.raises(ValueError, match=r"inconsistent.*\['labels'\]"):
        boxes_table(tmp_path).arrays
