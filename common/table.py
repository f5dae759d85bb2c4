"""A ragged table of per-image rows (pseudo boxes, proposals) as flat arrays plus offsets, memory-mapped,
written whole or in shards by several ranks and merged atomically.

Image k owns rows offsets[k]:offsets[k + 1] of every row array (boxes (M, 4), labels (M,)); an
image array (sizes (N, 2), image_ids (N,)) has one entry per image. On disk, under `root`: one
`<name>.npy` per array and `offsets.npy` (int64, N + 1), each written to a temporary name and
renamed, then `meta.json` (the caller's metadata plus num_images, num_boxes) last: its presence
marks a complete table. Shards are `root/shards/<prefix><index:06d>.npz` (the arrays of a run of
images plus their row `counts`), each written whole and renamed, so a killed run resumes from the
shards it finished.

The arrays are opened read-only and memory-mapped on first use in each process. A pickled table
(what a DataLoader worker receives, under fork, spawn or forkserver) carries its path and schema,
never the arrays: every worker maps the same pages of the page cache instead of holding a copy
(IMPLEMENTATION_NOTES.md, data loading at scale).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


class RaggedTable:
    """`RaggedTable(root, rows=("boxes",), images=("sizes",), what="proposal table", hint="run ...")`:
    the schema (names of the row arrays and of the per-image arrays) and where the table lives.
    Nothing is read until it is used; `what` and `hint` name the table and the command that makes
    it in the error raised when it is missing."""

    def __init__(self, root, rows, images=(), what: str = "table", hint: str = "", shard_prefix: str = ""):
        self.root, self.rows, self.images = Path(root), tuple(rows), tuple(images)
        self.what, self.hint, self.shard_prefix = what, hint, shard_prefix
        self._meta = self._arrays = None

    # ---------------------------------------------------------------------------- reading
    @property
    def complete(self) -> bool:
        return (self.root / "meta.json").is_file()

    @property
    def meta(self) -> dict:
        if self._meta is None:
            if not self.complete:
                raise FileNotFoundError(f"no complete {self.what} in {self.root} (meta.json missing)"
                                        + (f": {self.hint}" if self.hint else ""))
            self._meta = json.loads((self.root / "meta.json").read_text())
        return self._meta

    @property
    def arrays(self) -> dict:
        """name -> read-only memory map, for every row array, image array and `offsets`."""
        if self._arrays is None:
            self.meta  # noqa: B018 - raises the missing-table error first
            arrays = {n: np.load(self.root / f"{n}.npy", mmap_mode="r") for n in ("offsets", *self.rows, *self.images)}
            off = arrays["offsets"]
            bad = [n for n in self.rows if len(arrays[n]) != off[-1]] + \
                  [n for n in self.images if len(arrays[n]) != len(off) - 1]
            if off.ndim != 1 or len(off) == 0 or off[0] != 0 or bad:
                raise ValueError(f"{self.what} in {self.root} is inconsistent: offsets ({len(off)} entries, last "
                                 f"{off[-1] if len(off) else None}) do not match {bad or 'their own start'}; "
                                 f"delete the folder and make the table again")
            self._arrays = arrays
        return self._arrays

    def __len__(self) -> int:
        return len(self.arrays["offsets"]) - 1

    def __getitem__(self, k: int) -> dict:
        """The rows of image k: {name: array} (copies, off the memory map)."""
        a = self.arrays
        start, end = int(a["offsets"][k]), int(a["offsets"][k + 1])
        return {n: np.array(a[n][start:end]) for n in self.rows}

    def __getstate__(self):  # a worker reopens the memory maps instead of receiving their contents
        return dict(self.__dict__, _arrays=None)

    # ---------------------------------------------------------------------------- writing
    def write(self, counts, meta: dict, **arrays) -> None:
        """Write the whole table: `counts` (N,) rows per image, one array per name of the schema
        (row arrays of sum(counts) entries, image arrays of N). meta.json goes first (a table
        being rewritten is incomplete) and comes back last."""
        counts = np.asarray(counts, np.int64).reshape(-1)
        if set(arrays) != set(self.rows) | set(self.images):
            raise ValueError(f"{self.what}: arrays {sorted(arrays)} do not match the schema "
                             f"{sorted(self.rows + self.images)}")
        for n in self.rows + self.images:
            want = int(counts.sum()) if n in self.rows else len(counts)
            if len(arrays[n]) != want:
                raise ValueError(f"{self.what}: {n} has {len(arrays[n])} entries, expected {want}")
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meta.json").unlink(missing_ok=True)
        offsets = np.zeros(len(counts) + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        for name, arr in {"offsets": offsets, **arrays}.items():
            tmp = self.root / f".{name}.npy.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, np.asarray(arr))
            os.replace(tmp, self.root / f"{name}.npy")
        meta = dict(meta, num_images=len(counts), num_boxes=int(offsets[-1]))
        tmp = self.root / ".meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.root / "meta.json")
        self._meta = self._arrays = None

    def shard_path(self, index: int) -> Path:
        return self.root / "shards" / f"{self.shard_prefix}{index:06d}.npz"

    def write_shard(self, index: int, counts, **arrays) -> None:
        """One shard (a run of images: their `counts` and the schema's arrays), written whole to a
        temporary name and renamed, so a killed run leaves no half shard."""
        path = self.shard_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, counts=np.asarray(counts, np.int64), **arrays)
        os.replace(tmp, path)

    def missing_shards(self, num_shards: int) -> list[int]:
        return [i for i in range(num_shards) if not self.shard_path(i).is_file()]

    def merge_shards(self, num_shards: int, meta: dict, keep_shards: bool = False) -> None:
        """Concatenate shards 0 .. num_shards - 1 in order into the table (one process: rank 0),
        then delete them unless `keep_shards`."""
        if missing := self.missing_shards(num_shards):
            raise FileNotFoundError(f"{self.what}: shards {missing[:5]} of {num_shards} missing in "
                                    f"{self.root / 'shards'}; run the command again to make them")
        parts = []
        for i in range(num_shards):
            with np.load(self.shard_path(i)) as z:
                parts.append({n: z[n] for n in ("counts", *self.rows, *self.images)})
        cat = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
        self.write(cat.pop("counts"), meta, **cat)
        if not keep_shards:
            for i in range(num_shards):
                self.shard_path(i).unlink()
            if not any((self.root / "shards").iterdir()):
                (self.root / "shards").rmdir()
