"""Resumable bookkeeping for tools/convert.py: a checkpointed journal of per-file outcomes, and the report.

The journal (JSON lines in the split's work folder) holds one record per source file, in write order, followed by
checkpoint lines. Only records up to the last complete checkpoint count, so a run killed mid-write resumes from
that checkpoint and never trusts half-written state.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Journal:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []      # committed, in write order
        self.state: dict = {}              # extra fields of the last checkpoint
        self.pending: list[dict] = []
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        records, pending = [], []
        for line in self.path.read_text().splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                break                       # a line cut by a crash: nothing after it is committed
            if "checkpoint" in obj:
                records.extend(pending)
                pending = []
                if obj["checkpoint"] != len(records):
                    break
                self.state = obj
            else:
                pending.append(obj)
        self.records = records[:self.state.get("checkpoint", 0)]

    @property
    def done(self) -> int:
        return len(self.records)

    def add(self, record: dict) -> None:
        self.pending.append(record)

    def commit(self, upto: int | None = None, **state) -> None:
        """Make the first `upto` pending records (all by default) durable, with `state` in the checkpoint."""
        upto = len(self.pending) if upto is None else upto
        batch, self.pending = self.pending[:upto], self.pending[upto:]
        self.records.extend(batch)
        self.state = {"checkpoint": len(self.records), **state}
        with open(self.path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in batch) + json.dumps(self.state) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def override(self, pos: int, **fields) -> None:
        """Change a committed record (a file that failed only at write time) and rewrite the journal."""
        self.records[pos].update(fields)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records) + json.dumps(self.state) + "\n")
        os.replace(tmp, self.path)


def build_report(*, fmt: str, split: str, source: str, output: str, classes: list[str], records: list[dict],
                 args: dict, seconds: dict, workers: int, bytes_out: int, extra: dict | None = None) -> dict:
    """The split's JSON report: what was written, per class, and every repaired or skipped file with the reason."""
    written = [r for r in records if r["status"] != "skipped"]
    per_class = Counter(classes[r["label"]] for r in written)
    images_per_s = len(records) / seconds["total"] if seconds.get("total") else None
    return {
        "format": fmt, "split": split, "source": source, "output": output, "args": args,
        "samples": len(written), "files_seen": len(records),
        "repaired_count": sum(r["status"] == "repaired" for r in records),
        "skipped_count": len(records) - len(written),
        "counts": {c: per_class.get(c, 0) for c in classes},
        "bytes_in": sum(r.get("bytes_in", 0) for r in records), "bytes_out": bytes_out,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "workers": workers,
        "images_per_s": round(images_per_s, 1) if images_per_s else None,
        "images_per_s_per_worker": round(images_per_s / max(workers, 1), 1) if images_per_s else None,
        "repaired": [{"file": r["file"], "reason": r["reason"]} for r in records if r["status"] == "repaired"],
        "skipped": [{"file": r["file"], "reason": r["reason"]} for r in records if r["status"] == "skipped"],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
