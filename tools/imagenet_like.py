"""An ImageNet-like JPEG folder built offline from scikit-image's bundled photos, for measurements that need
realistic files but no dataset (tools/gpu_check.py).

    python tools/imagenet_like.py OUT [--count 2000] [--size 400 350] [--quality 97] [--links N [--classes 1000]]

OUT/train/<class>/<n>.JPEG: one class per photo; each file a random crop of its photo (10-100% of the area,
random flip), resized to about `size` (width, height, each +-15%), given a sensor-like grain (the bundled photos
are smoother than ImageNet's, and JPEG size and decode cost follow the detail) and re-encoded. Like ImageNet's files, most
are baseline 4:2:0 JPEGs; every 8th is progressive, every 20th grayscale, and exactly one is CMYK. At 400x350
and quality 97 a file is ~100 KB (ImageNet's mean: ~110 KB at ~400x350).

`--links N` then makes OUT/links/train/<class>/ with N hard links to those files in `--classes` folders: an
ImageNet-sized tree (1,281,167 files) for start-up measurements at almost no disk cost (tools/profile_files.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from tools.demo_data import _load_photos

_PHOTOS: list | None = None
GRAIN = 8.0          # std of the luminance noise added to each file: real photos' detail, and their file size


def kind_of(k: int) -> str:
    """What the k-th file is: exactly one CMYK (k == 7), every 20th grayscale, every 8th progressive."""
    if k == 7:
        return "cmyk"
    if k % 20 == 3:
        return "gray"
    return "progressive" if k % 8 == 5 else "baseline"


def _init() -> None:
    global _PHOTOS
    _PHOTOS = _load_photos()


def _write(job) -> tuple[str, int]:
    k, out, size, quality, seed = job
    cls, photo = _PHOTOS[k % len(_PHOTOS)]
    rng = np.random.default_rng([seed, k])
    w = max(8, round(size[0] * rng.uniform(0.85, 1.15)))
    h = max(8, round(size[1] * rng.uniform(0.85, 1.15)))
    W, H = photo.size
    area = rng.uniform(0.1, 1.0) * W * H
    cw = int(min(W, max(8, np.sqrt(area * w / h))))
    ch = int(min(H, max(8, cw * h / w)))
    x0, y0 = rng.integers(0, W - cw + 1), rng.integers(0, H - ch + 1)
    im = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    a = np.asarray(im, dtype=np.float32) + rng.normal(0.0, GRAIN, (h, w, 1))   # sensor-like grain
    im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    kind = kind_of(k)
    if kind in ("cmyk", "gray"):
        im = im.convert("CMYK" if kind == "cmyk" else "L")
    path = Path(out) / "train" / f"{k % len(_PHOTOS)}_{cls}" / f"{k:06d}.JPEG"
    im.save(path, "JPEG", quality=quality, progressive=kind == "progressive")
    return kind, path.stat().st_size


def build_imagenet_like(out, count: int = 2000, size: tuple[int, int] = (400, 350), quality: int = 97,
                        seed: int = 0, workers: int | None = None) -> dict:
    """Write the folder (see the module notes) with `workers` processes; returns a summary."""
    _init()
    if not _PHOTOS:
        raise RuntimeError("no bundled photos found: install scikit-image")
    out = Path(out)
    for i, (cls, _) in enumerate(_PHOTOS):
        (out / "train" / f"{i}_{cls}").mkdir(parents=True, exist_ok=True)
    jobs = [(k, str(out), tuple(size), quality, seed) for k in range(count)]
    workers = workers or max(1, (os.cpu_count() or 2) - 1)
    if workers > 1:
        with get_context("fork").Pool(workers, initializer=_init) as pool:
            done = pool.map(_write, jobs, chunksize=16)
    else:
        done = [_write(j) for j in jobs]
    kinds = [k for k, _ in done]
    sizes = [s for _, s in done]
    return {"path": str(out), "files": count, "classes": len(_PHOTOS), "size": list(size), "quality": quality,
            "mean_kb": sum(sizes) / max(1, len(sizes)) / 1e3, "progressive": kinds.count("progressive"),
            "gray": kinds.count("gray"), "cmyk": kinds.count("cmyk")}


def link_tree(out, n: int, classes: int = 1000) -> dict:
    """OUT/links/train/c0000..: `n` hard links cycling over OUT/train's files, `classes` folders."""
    src = sorted(str(f) for f in Path(out, "train").rglob("*.JPEG"))
    root = Path(out) / "links" / "train"
    dirs = [root / f"c{c:04d}" for c in range(classes)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        dst = dirs[k % classes] / f"{k:07d}.JPEG"
        if not dst.exists():
            os.link(src[k % len(src)], dst)
    return {"links": n, "classes": classes, "path": str(root.parent)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--count", type=int, default=2000)
    p.add_argument("--size", type=int, nargs=2, default=(400, 350), metavar=("W", "H"))
    p.add_argument("--quality", type=int, default=97)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--links", type=int, default=0, help="also make OUT/links: N hard links in --classes folders")
    p.add_argument("--classes", type=int, default=1000)
    args = p.parse_args(argv)
    print(json.dumps(build_imagenet_like(args.out, args.count, tuple(args.size), args.quality, args.seed)))
    if args.links:
        print(json.dumps(link_tree(args.out, args.links, args.classes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
