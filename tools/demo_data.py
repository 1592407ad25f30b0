"""Build a small ImageNet-layout folder of real images for demos and tests.

    python tools/demo_data.py OUT [--limit-per-class 300] [--val-per-class 100]
        [--size 64] [--source auto|fashion-mnist|photos] [--seed 0] [--quality 90]

Writes OUT/{train,val}/<class>/*.jpg, OUT/classes.txt and OUT/demo_data.json.
Source: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
(dir overridable with $FASTTWIST_FMNIST_DIR), else crops of scikit-image's
bundled photos. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from engine.cli import entry_point

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["0_tshirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
                  "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot"]
# Photos shipped inside the scikit-image wheel (no pooch fetch needed).
SKIMAGE_PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "camera.png",
                  "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "motorcycle_left.png",
                  "coins.png"]
FORMAT_VERSION = 1


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse a gzipped idx file (ubyte); ndim=3 for images, 1 for labels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (apt install dataset-fashion-mnist, "
                                "or set FASTTWIST_FMNIST_DIR)")
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable gzipped idx file ({e})") from None
    magic = 0x800 + ndim
    hdr = 4 + 4 * ndim
    if len(data) < hdr or int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path}: bad idx header (expected magic {magic:#x} for ubyte ndim={ndim})")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    need = hdr + int(np.prod(shape))
    if len(data) < need:
        raise ValueError(f"{path}: truncated idx file ({len(data)} bytes, expected {need})")
    return np.frombuffer(data, np.uint8, count=need - hdr, offset=hdr).reshape(shape)


def resolve_fmnist_dir(override=None) -> Path:
    return Path(override or os.environ.get("FASTTWIST_FMNIST_DIR") or FMNIST_DIR)


def load_fmnist(split: str, directory=None):
    """Return (images[N,28,28] uint8, labels[N] uint8) for split 'train' or 't10k'."""
    d = resolve_fmnist_dir(directory)
    x = read_idx(d / f"{split}-images-idx3-ubyte.gz", 3)
    y = read_idx(d / f"{split}-labels-idx1-ubyte.gz", 1)
    if len(x) != len(y):
        raise ValueError(f"{d}: {split} images ({len(x)}) and labels ({len(y)}) differ in count")
    return x, y


def fmnist_available(directory=None) -> bool:
    d = resolve_fmnist_dir(directory)
    return all((d / f"{s}-{k}-ubyte.gz").is_file()
               for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))


def first_per_class(labels: np.ndarray, n: int, num_classes: int = 10) -> list:
    """Indices of the first n samples of each class (stable order), one array per class."""
    return [np.flatnonzero(labels == c)[:n] for c in range(num_classes)]


def _gray_to_rgb(img28: np.ndarray, size: int) -> Image.Image:
    im = Image.fromarray(img28, "L")
    if size != im.width:
        im = im.resize((size, size), Image.BICUBIC)
    return im.convert("RGB")


def _fmnist_splits(limits, size, directory):
    for split, file_split in (("train", "train"), ("val", "t10k")):
        x, y = load_fmnist(file_split, directory)
        for c, idx in enumerate(first_per_class(y, limits[split])):
            yield split, FMNIST_CLASSES[c], ((f"{i:05d}", _gray_to_rgb(x[i], size)) for i in idx)


def _load_photos():
    try:
        import skimage.data
        base = Path(skimage.data.__file__).parent
        photos = [(Path(n).stem, base / n) for n in SKIMAGE_PHOTOS if (base / n).is_file()]
        return [(name, Image.open(p).convert("RGB")) for name, p in photos]
    except ImportError:
        pass
    try:
        from sklearn.datasets import load_sample_images
        ds = load_sample_images()
        return [(Path(f).stem, Image.fromarray(a).convert("RGB"))
                for f, a in zip(ds.filenames, ds.images)]
    except ImportError:
        raise RuntimeError("no demo image source: install the apt package `dataset-fashion-mnist` "
                           "or `pip install scikit-image`") from None


def _photo_splits(limits, size, seed):
    photos = _load_photos()
    if not photos:
        raise RuntimeError("no bundled photos found; install `dataset-fashion-mnist` (apt)")
    classes = [f"{i}_{name}" for i, (name, _) in enumerate(photos)]
    # Pre-shrink so the largest crop is ~3x the output size: keeps cropping cheap.
    photos = [(n, im.resize((max(1, round(im.width * r)), max(1, round(im.height * r))), Image.BICUBIC)
               if (r := 4 * size / min(im.size)) < 1 else im) for n, im in photos]
    for s, split in enumerate(("train", "val")):
        for c, (cls, (_, photo)) in enumerate(zip(classes, photos)):
            yield split, cls, _crops(photo, limits[split], size, np.random.default_rng([seed, s, c]))


def _crops(photo, n, size, rng):
    W, H = photo.size
    for k in range(n):
        side = int(min(W, H) * rng.uniform(0.25, 0.7))
        x0, y0 = rng.integers(0, W - side + 1), rng.integers(0, H - side + 1)
        im = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
        yield f"{k:05d}", im.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def build_demo(out: Path, limit_per_class=300, val_per_class=100, size=64, source="auto",
               seed=0, quality=90, fmnist_dir=None, verbose=False) -> dict:
    """Build (or reuse) the demo dataset at `out`; return its manifest."""
    out = Path(out)
    args = dict(limit_per_class=int(limit_per_class), val_per_class=int(val_per_class), size=int(size),
                source=source, seed=int(seed), quality=int(quality), version=FORMAT_VERSION)
    man_path = out / "demo_data.json"
    if man_path.is_file():
        try:
            old = json.loads(man_path.read_text())
        except (OSError, ValueError):
            old = {}
        if old.get("args") == args:
            old["already_built"] = True
            if verbose:
                print(f"{out}: already built")
            return old
    if source == "auto":
        resolved = "fashion-mnist" if fmnist_available(fmnist_dir) else "photos"
    elif source in ("fashion-mnist", "photos"):
        resolved = source
    else:
        raise ValueError(f"unknown source {source!r} (auto|fashion-mnist|photos)")
    limits = {"train": args["limit_per_class"], "val": args["val_per_class"]}
    gen = (_fmnist_splits(limits, size, fmnist_dir) if resolved == "fashion-mnist"
           else _photo_splits(limits, size, seed))
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    counts, classes = {"train": {}, "val": {}}, []
    try:
        for split, cls, items in gen:
            d = tmp / split / cls
            d.mkdir(parents=True, exist_ok=True)
            n = 0
            for stem, im in items:
                im.save(d / f"{stem}.jpg", "JPEG", quality=args["quality"])
                n += 1
            counts[split][cls] = n
            if cls not in classes:
                classes.append(cls)
        manifest = dict(source=resolved, args=args, classes=classes, counts=counts,
                        totals={k: sum(v.values()) for k, v in counts.items()})
        (tmp / "classes.txt").write_text("".join(c + "\n" for c in classes))
        man_tmp = tmp / "demo_data.json"
        man_tmp.write_text(json.dumps(manifest, indent=1))
        old_dir = out.with_name(f"{out.name}.old-{os.getpid()}")
        if out.exists():
            out.rename(old_dir)
        tmp.rename(out)
        shutil.rmtree(old_dir, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        _summary(out, manifest)
    return manifest


def _summary(out, m):
    rows = [(c, str(m["counts"]["train"].get(c, 0)), str(m["counts"]["val"].get(c, 0)))
            for c in m["classes"]]
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=f"{out} ({m['source']}, {m['args']['size']}px)")
        for col in ("class", "train", "val"):
            t.add_column(col)
        for r in rows:
            t.add_row(*r)
        t.add_row("total", str(m["totals"]["train"]), str(m["totals"]["val"]))
        Console().print(t)
    except ImportError:
        print(f"{out}: source={m['source']} train={m['totals']['train']} val={m['totals']['val']}")
        for r in rows:
            print("  %-16s %6s %6s" % r)


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value
    parse.__name__ = f"integer >= {low}"      # argparse names the type in its one-line error
    return parse


@entry_point("demo_data.py")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--limit-per-class", type=_at_least(1), default=300)
    p.add_argument("--val-per-class", type=_at_least(0), default=100)
    p.add_argument("--size", type=_at_least(8), default=64)
    p.add_argument("--source", choices=["auto", "fashion-mnist", "photos"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=_at_least(1), default=90, help="JPEG quality, 1-95")
    p.add_argument("--fmnist-dir", default=None, help=f"idx dir (default $FASTTWIST_FMNIST_DIR or {FMNIST_DIR})")
    a = p.parse_args(argv)
    if a.quality > 95:
        p.error(f"argument --quality: {a.quality} is above 95 (PIL's largest useful JPEG quality)")
    try:
        build_demo(a.out, a.limit_per_class, a.val_per_class, a.size, a.source, a.seed, a.quality,
                   fmnist_dir=a.fmnist_dir, verbose=True)
    except RuntimeError as e:           # no image source on this machine: a setup step, not a bug
        raise FileNotFoundError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
