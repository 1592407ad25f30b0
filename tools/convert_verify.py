"""`tools/convert.py --verify OUT`: re-read a converted dataset and check it against its reports.

Per split: sample count, labels (per class and per sample, against SPLIT.samples.tsv), image sizes within the
report's --max-size, and a decode of up to MAX_DECODE evenly spaced images. Shards also have every index entry
checked against the tar members and both label encodings (.cls, .i64) compared.
"""
from __future__ import annotations

import json
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines.shards import ShardDataset, read_index, sample_key, shard_pairs
from pipelines.sources import decode_rgb

MAX_DECODE = 2000


class _Checks:
    def __init__(self, console, split: str):
        self.console, self.split, self.ok = console, split, True

    def check(self, cond: bool, what: str) -> None:
        if not cond:
            self.ok = False
            self.console.print(f"[red]FAIL[/red] {self.split}: {what}")


def _expected(out: Path, split: str, report: dict, classes: list[str], c: _Checks) -> np.ndarray:
    lines = (out / f"{split}.samples.tsv").read_text().splitlines()[1:]
    labels = np.array([int(line.split("\t")[1]) for line in lines], dtype=np.int64)
    c.check(len(labels) == report["samples"], f"samples.tsv lists {len(labels)} samples, report says "
            f"{report['samples']}")
    per_class = Counter(classes[i] for i in labels.tolist())
    c.check(all(per_class.get(k, 0) == v for k, v in report["counts"].items()),
            "per-class counts of samples.tsv differ from the report")
    return labels


def _spread(n: int) -> list[int]:
    return sorted(set(np.linspace(0, n - 1, min(n, MAX_DECODE)).astype(int).tolist())) if n else []


def _verify_beton(path: Path, report: dict, labels: np.ndarray, c: _Checks) -> None:
    from ffcv.reader import Reader
    r = Reader(str(path))
    c.check(int(r.num_samples) == len(labels), f"{path.name} has {r.num_samples} samples, expected {len(labels)}")
    if int(r.num_samples) != len(labels):
        return
    field = {name: r.metadata[f"f{i}"] for i, name in enumerate(r.field_names)}
    got = np.asarray(field["label"], dtype=np.int64)
    bad = np.flatnonzero(got != labels)
    c.check(len(bad) == 0, f"{len(bad)} labels differ from samples.tsv (first at index {bad[:1].tolist()})")
    meta = field["image"]
    h, w = meta["height"].astype(np.int64), meta["width"].astype(np.int64)
    limit = report["args"]["max_size"]
    c.check(bool(((h > 0) & (w > 0) & (np.maximum(h, w) <= limit)).all()), f"image sizes outside 1..{limit}")
    alloc = r.alloc_table
    where = {int(s): (int(p), int(n)) for s, p, n in zip(alloc["sample_id"], alloc["ptr"], alloc["size"])}
    with open(path, "rb") as f:
        for i in _spread(len(labels)):
            ptr, size = where[i]
            f.seek(ptr)
            data = f.read(size)
            if meta["mode"][i] == 1:   # raw pixels
                c.check(size == h[i] * w[i] * 3, f"sample {i}: raw image of {size} bytes, expected {h[i]}x{w[i]}x3")
            else:
                try:
                    img = decode_rgb(data, f"{path}:{i}")
                    c.check(tuple(img.shape) == (3, h[i], w[i]), f"sample {i}: decodes to {tuple(img.shape)}")
                except ValueError as exc:
                    c.check(False, f"sample {i}: {exc}")


def _verify_shards(directory: Path, labels: np.ndarray, c: _Checks) -> None:
    pos = 0
    for tar, idx in shard_pairs(directory):
        entries = read_index(idx)
        with tarfile.open(tar) as t:
            members = {m.name: m for m in t.getmembers()}
        n = len(entries["jpg"])
        c.check(len(members) == 3 * n, f"{tar.name}: {len(members)} members for {n} indexed samples")
        for k in range(n):
            key = sample_key(pos + k)
            for ext in ("jpg", "cls", "i64"):
                m = members.get(f"{key}.{ext}")
                off, size = entries[ext][k] if ext in entries else (-1, -1)
                if m is None or (m.offset_data, m.size) != (off, size):
                    c.check(False, f"{idx.name} line {k + 2}: {key}.{ext} does not match the tar member")
                    return
        pos += n
    c.check(pos == len(labels), f"shards hold {pos} samples, expected {len(labels)}")
    ds = ShardDataset(directory)
    if len(ds) != len(labels):
        return
    typed = np.array([struct.unpack("<qq", ds.member(i, "i64")) for i in range(len(ds))], dtype=np.int64)
    text = np.array([int(ds.member(i, "cls")) for i in range(len(ds))], dtype=np.int64)
    c.check(bool((typed[:, 1] == np.arange(len(ds))).all()), ".i64 indices are not 0..N-1 in order")
    c.check(bool((typed[:, 0] == labels).all() and (text == labels).all()),
            "labels in .cls/.i64 differ from samples.tsv")
    for i in _spread(len(ds)):
        try:
            decode_rgb(ds.member(i, "jpg"), ds.files[i])
        except ValueError as exc:
            c.check(False, f"sample {i}: {exc}")


def verify(out: Path, console) -> bool:
    out = Path(out)
    reports = sorted(out.glob("*.report.json"))
    if not (out / "classes.json").is_file() or not reports:
        console.print(f"[red]FAIL[/red] '{out}' has no classes.json or no SPLIT.report.json; is it a "
                      f"tools/convert.py output?")
        return False
    index = json.loads((out / "classes.json").read_text())
    classes = sorted(index, key=index.get)
    ok = True
    for rp in reports:
        report = json.loads(rp.read_text())
        split = report["split"]
        c = _Checks(console, split)
        c.check(list(report["counts"]) == classes, "report classes differ from classes.json")
        labels = _expected(out, split, report, classes, c)
        if report["format"] == "ffcv":
            _verify_beton(out / report["output"], report, labels, c)
        else:
            _verify_shards(out / report["output"], labels, c)
        if c.ok:
            console.print(f"OK {split}: {len(labels):,} samples in {len(classes)} classes match the report "
                          f"({min(len(labels), MAX_DECODE)} decoded)")
        ok &= c.ok
    return ok
