"""Start-up cost of a raw image folder: listing the split and checking every file for the `dali` backend
(pipelines/filecheck.py: size, magic bytes, end marker; one head and one tail read per file).

    python tools/profiler.py files --data ROOT [--split train] [--threads 16] [--json out.json]

Build a 1.28M-file folder to measure with: `python tools/imagenet_like.py OUT --count 2000 --links 1281167`
(hard links to 2,000 real JPEGs in 1,000 class folders).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.filecheck import check_files
from pipelines.sources import LayoutError, load_source


def measure(root: str, split: str, threads: list[int]) -> dict:
    t0 = time.perf_counter()
    files, _ = load_source(root, split)
    listed = time.perf_counter() - t0
    out = {"data": str(root), "split": split, "files": len(files), "list_seconds": round(listed, 2), "check": []}
    for n in threads:
        t0 = time.perf_counter()
        bad = check_files(files, n)
        s = time.perf_counter() - t0
        out["check"].append({"threads": n, "seconds": round(s, 2), "files_per_s": round(len(files) / s),
                             "bad": len(bad)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--threads", default="16", help="comma-separated thread counts to time (e.g. 1,4,16)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        r = measure(a.data, a.split, [int(x) for x in a.threads.split(",")])
    except (LayoutError, ValueError) as exc:
        print(f"profiler.py files: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(r))
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return 0
