"""Resized-JPEG tar shards (webdataset naming) with DALI index files: the format, its writer and a random-access
reader for the torch backend.

A converted split is a folder of numbered shards, `SPLIT/SPLIT-000000.tar` + `SPLIT-000000.idx`, ... Each sample
has three members sharing one key:

    KEY.jpg   the image (JPEG)
    KEY.cls   the label as ASCII decimal (the webdataset convention)
    KEY.i64   label and dataset index as two little-endian int64 (for typed readers: DALI `dtypes=INT64`)

KEY is the sample's dataset index, zero-padded; samples are numbered 0..N-1 across the shards in order. The
index files use the format of DALI's `wds2idx` (v1.2), which `fn.readers.webdataset(index_paths=...)` reads:
first line `v1.2 <num_samples>`, then one line per sample listing `<ext> <data offset> <size> <member name>` for
each member (offsets point at member data and are multiples of 512).
"""
from __future__ import annotations

import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np

from pipelines.sources import ImageDataset

INDEX_VERSION = "v1.2"
KEY_DIGITS = 8
_BLOCK = 512


def shard_name(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}"


def sample_key(index: int) -> str:
    return f"{index:0{KEY_DIGITS}d}"


def encode_label_index(label: int, index: int) -> bytes:
    return struct.pack("<qq", label, index)


class ShardWriter:
    """Append samples to `directory/PREFIX-NNNNNN.tar`, starting a new shard once the next sample would push the
    current one past `shard_bytes`. A shard is written as `.tar.partial` and renamed, together with its index
    file, only when complete; `on_shard(name, samples, nbytes)` is then called (the converter checkpoints there)."""

    def __init__(self, directory: str | Path, prefix: str, shard_bytes: int, first_shard: int = 0,
                 on_shard=None):
        self.dir, self.prefix, self.shard_bytes = Path(directory), prefix, int(shard_bytes)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.number, self.on_shard = first_shard, on_shard
        self._tar: tarfile.TarFile | None = None
        self._lines: list[str] = []

    def add(self, index: int, jpeg: bytes, label: int) -> None:
        key = sample_key(index)
        members = [(f"{key}.jpg", jpeg), (f"{key}.cls", str(label).encode()),
                   (f"{key}.i64", encode_label_index(label, index))]
        size = sum(_BLOCK + -(-len(d) // _BLOCK) * _BLOCK for _, d in members)
        if self._tar is not None and self._lines and self._tar.offset + size > self.shard_bytes:
            self._finish()
        if self._tar is None:
            self._tar = tarfile.open(self._path(".tar.partial"), "w", format=tarfile.USTAR_FORMAT)
        parts = []
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            parts.append(f"{name.split('.', 1)[1]} {self._tar.offset + _BLOCK} {len(data)} {name}")
            self._tar.addfile(info, io.BytesIO(data))
        self._lines.append(" ".join(parts))

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def _path(self, suffix: str) -> Path:
        return self.dir / (shard_name(self.prefix, self.number) + suffix)

    def _finish(self) -> None:
        self._tar.close()
        idx = self._path(".idx.partial")
        idx.write_text(f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        tar = self._path(".tar")
        self._path(".tar.partial").rename(tar)
        idx.rename(self._path(".idx"))
        done = (shard_name(self.prefix, self.number), len(self._lines), tar.stat().st_size)
        self._tar, self._lines = None, []
        self.number += 1
        if self.on_shard is not None:
            self.on_shard(*done)


def read_index(path: str | Path) -> dict[str, np.ndarray]:
    """Parse one v1.2 index file into {ext: (num_samples, 2) int64 array of (offset, size)}; -1 where a sample
    lacks that member."""
    path = Path(path)
    lines = path.read_text().splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise ValueError(f"shard index '{path}' is not a complete {INDEX_VERSION} index "
                         f"(header {lines[0] if lines else '<empty>'!r}, {max(len(lines) - 1, 0)} sample lines); "
                         f"re-run tools/convert.py on this dataset")
    out: dict[str, np.ndarray] = {}
    for i, line in enumerate(lines[1:]):
        tok = line.split()
        for j in range(0, len(tok) - 3, 4):
            arr = out.setdefault(tok[j], np.full((len(lines) - 1, 2), -1, dtype=np.int64))
            arr[i] = int(tok[j + 1]), int(tok[j + 2])
    return out


def find_shards(root: str | Path, split: str) -> Path | None:
    """`root/split` when it is a folder of shards with index files, else None."""
    d = Path(root) / split
    return d if d.is_dir() and any(d.glob("*.idx")) else None


def shard_pairs(directory: str | Path) -> list[tuple[Path, Path]]:
    """(tar, index) pairs of a shard folder, in order; a tar without its index is an error."""
    directory = Path(directory)
    tars = sorted(directory.glob("*.tar"))
    missing = [t.name for t in tars if not t.with_suffix(".idx").is_file()]
    if missing or not tars:
        raise FileNotFoundError(f"shard folder '{directory}': " + (f"no index file for {', '.join(missing[:3])}"
                                if missing else "no .tar shards") + "; re-run tools/convert.py --format shards")
    return [(t, t.with_suffix(".idx")) for t in tars]


class _SampleNames:
    """`SHARD.tar:KEY` of sample i, computed on demand (for messages), as `ImageDataset.files` would hold."""

    def __init__(self, tars: list[str], shard_of: np.ndarray):
        self.tars, self.shard_of = tars, shard_of

    def __len__(self) -> int:
        return len(self.shard_of)

    def __getitem__(self, i: int) -> str:
        return f"{self.tars[self.shard_of[i]]}:{sample_key(i)}"


class ShardDataset(ImageDataset):
    """The torch backend's `ImageDataset` over tar shards: sample i is read at random through the index files
    (decoded, or as raw bytes for GPU decoding); its label comes from `.i64` (or `.cls`). File handles are
    opened lazily in each worker process."""

    def __init__(self, directory: str | Path, transform=None, decode: bool = True):
        pairs = shard_pairs(directory)
        self.tars = [str(tar) for tar, _ in pairs]
        shards = [read_index(idx) for _, idx in pairs]
        for (_, idx), entries in zip(pairs, shards):
            if "jpg" not in entries or ("i64" not in entries and "cls" not in entries):
                raise ValueError(f"shard index '{idx}' has no jpg and cls members; expected webdataset shards "
                                 f"written by tools/convert.py")
        self.shard_of = np.concatenate([np.full(len(e["jpg"]), n, dtype=np.int32) for n, e in enumerate(shards)])
        self.tables = {ext: np.concatenate([e.get(ext, np.full((len(e["jpg"]), 2), -1, dtype=np.int64))
                                            for e in shards])
                       for ext in sorted(set().union(*shards))}
        self.typed_label = "i64" in self.tables and bool((self.tables["i64"][:, 0] >= 0).all())
        self._fds: dict[int, int] = {}
        super().__init__(_SampleNames(self.tars, self.shard_of), None, transform, decode)

    def member(self, i: int, ext: str) -> bytes:
        """The bytes of sample i's `KEY.ext` member."""
        shard = int(self.shard_of[i])
        offset, size = (int(v) for v in self.tables[ext][i]) if ext in self.tables else (-1, -1)
        if offset < 0:
            raise ValueError(f"{self.files[i]}: no .{ext} member; re-run tools/convert.py")
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.tars[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise ValueError(f"{self.files[i]}: shard is shorter than its index says; re-run tools/convert.py")
        return data

    def label(self, i: int) -> int:
        return struct.unpack("<q", self.member(i, "i64")[:8])[0] if self.typed_label else int(self.member(i, "cls"))

    def _read(self, i: int) -> tuple[bytes, int]:
        return self.member(i, "jpg"), self.label(i)

    def __getstate__(self):
        return {**self.__dict__, "_fds": {}}

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
