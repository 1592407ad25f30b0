"""Conversion and loader-only throughput, every backend on the same images, in one run (BENCHMARKS.md).

    python tools/profiler.py loaders OUT [--per-class 100] [--size 384] [--batch-size 64] [--workers 2] [--epochs 2]

Builds OUT/src (crops of the photos bundled with scikit-image, SIZE px JPEGs, 10 classes), converts it to .beton
and to shards (--workers 1 and N: conversion images/s per core), then times whole epochs of the official
multi-crop recipe (2x224 + 6x96) after one warm-up epoch:

    torch           ImageFolder JPEGs; DataLoader workers decode and run MultiCropAugment        (baseline)
    torch-shards    the same from the tar shards
    ffcv-canvas     FFCV decodes whole images once into a canvas; MultiCropAugment crops it      (data.backend=ffcv)
    ffcv-views      FFCV's own crop decoder: one decode, all 8 RandomResizedCrops on the CPU
                    (resize_crop), then the photometric ops with MultiCropAugment (identity crops)
Each is timed twice: the CPU stage alone over whole epochs (what the CPU does per sample when the engine runs on
a GPU: decode, and for ffcv-views the crops), and the full pipeline on this CPU over --full-batches batches.
Writes OUT/bench.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import replace
from pathlib import Path


import numpy as np
import torch
from ffcv.fields.rgb_image import SimpleRGBImageDecoder, get_random_crop
from ffcv.libffcv import resize_crop
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.transforms import ToTensor

from engine.config import load_config
from pipelines import build_pipeline
from pipelines.ffcv_backend import EpochOrder, compile_image_reader
from pipelines.augment.engine import MultiCropAugment
from pipelines.spec import MultiCropSpec
from pipelines.order import EpochSampler, batch_seed
from tools import convert
from tools.demo_data import build_demo


class MultiViewCropDecoder(SimpleRGBImageDecoder):
    """One JPEG decode per image, then every view's RandomResizedCrop (FFCV's get_random_crop + resize_crop)
    written into one packed uint8 buffer per sample: view v at offsets[v], (size_v, size_v, 3)."""

    def __init__(self, sizes, scales, ratio=(3 / 4, 4 / 3)):
        super().__init__()
        self.sizes, self.scales, self.ratio = list(sizes), list(scales), ratio

    def declare_state_and_memory(self, previous_state):
        h, w = int(self.metadata["height"].max()), int(self.metadata["width"].max())
        total, u8 = sum(3 * s * s for s in self.sizes), np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=(total,), dtype=u8),
                (AllocationQuery((total,), u8), AllocationQuery((h * w * 3,), u8)))

    def generate_code(self):
        read_image, resize_crop_c = compile_image_reader(self), Compiler.compile(resize_crop)
        get_crop_c, my_range = Compiler.compile(get_random_crop), Compiler.get_iterator()
        sizes = np.array(self.sizes, dtype=np.int64)
        offsets = np.cumsum([0] + [3 * s * s for s in self.sizes])[:-1].astype(np.int64)
        scales, ratio, nviews = np.array(self.scales, dtype=np.float64), np.array(self.ratio), len(self.sizes)

        def decode(batch_indices, my_storage, metadata, storage_state):
            dest, temp = my_storage
            for i in my_range(len(batch_indices)):
                img = read_image(metadata[batch_indices[i]], storage_state, temp[i])
                h, w = img.shape[0], img.shape[1]
                for v in range(nviews):
                    s = sizes[v]
                    y, x, ch, cw = get_crop_c(h, w, scales[v], ratio)
                    out = dest[i][offsets[v]:offsets[v] + 3 * s * s].reshape(s, s, 3)
                    resize_crop_c(img, y, y + ch, x, x + cw, out)
            return dest[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class ViewsPipeline:
    """ffcv-views: MultiViewCropDecoder, then the photometric ops of each group on its already-cropped views."""

    def __init__(self, path, spec: MultiCropSpec, batch_size: int, workers: int, seed: int = 0):
        views = spec.view_groups()
        self.spec, self.sizes = spec, [g.size for g in views]
        self.sampler = EpochSampler(self._n(path), shuffle=True, seed=seed)
        self.order = EpochOrder(self.sampler, batch_size, drop_last=True)
        decoder = MultiViewCropDecoder(self.sizes, [g.scale for g in views])
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=workers, order=self.order,
                             drop_last=False, pipelines={"image": [decoder, ToTensor()], "label": None})
        identity = [replace(g, count=1, scale=(1.0, 1.0), ratio=(1.0, 1.0)) for g in spec.groups]
        self.photometric = [MultiCropAugment(replace(spec, groups=(g,))) for g in identity]
        self.seed, self.epoch = seed, 0

    @staticmethod
    def _n(path) -> int:
        from ffcv.reader import Reader
        return int(Reader(str(path)).num_samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def cpu_stage(self):
        for (packed,) in self.loader:
            yield packed.shape[0]

    def __iter__(self):
        order = None
        for k, (packed,) in enumerate(self.loader):
            order = torch.from_numpy(self.order.last.astype(np.int64)) if order is None else order
            n, off, views = packed.shape[0], 0, []
            for s in self.sizes:
                views.append(packed[:, off:off + 3 * s * s].view(n, s, s, 3).permute(0, 3, 1, 2))
                off += 3 * s * s
            idx = order[k * n:(k + 1) * n]
            gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, 0, idx))
            out, v0 = [], 0
            for g, aug in zip(self.spec.groups, self.photometric):
                x = aug(torch.cat(views[v0:v0 + g.count]), generator=gen)[0]
                out.extend(x.split(n))
                v0 += g.count
            yield n


def _time_epochs(make_iter, set_epoch, epochs: int, max_batches: int | None = None) -> dict:
    """Samples/s over `epochs` timed epochs (at most `max_batches` batches each) after one warm-up epoch (also
    reported: the warm-up's extra time). `make_iter()` yields the number of samples of each batch."""
    def run(e):
        set_epoch(e)
        t = time.perf_counter()
        n = sum(itertools.islice(make_iter(), max_batches))
        return time.perf_counter() - t, n
    first, _ = run(0)
    times, counts = zip(*(run(e) for e in range(1, epochs + 1)))
    per_epoch = sum(times) / epochs
    return {"samples_per_s": round(sum(counts) / sum(times), 1), "epoch_s": round(per_epoch, 2),
            "warmup_extra_s": round(first - per_epoch, 1), "samples_per_epoch": counts[0]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="profiler.py loaders", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs of the CPU stage")
    p.add_argument("--full-batches", type=int, default=3, help="batches timed (one epoch) of the full pipelines "
                   "(0: time the CPU stage only)")
    a = p.parse_args(argv)
    src, res = a.out / "src", {"args": vars(a) | {"out": str(a.out)}, "conversion": {}, "loaders": {}}
    build_demo(src, limit_per_class=a.per_class, val_per_class=1, size=a.size, source="photos")
    for fmt in ("shards", "ffcv"):
        for w in sorted({1, a.workers}):
            out = a.out / f"{fmt}-w{w}"
            if convert.main([str(src), str(out), "--format", fmt, "--workers", str(w), "--splits", "train"]):
                return 1
            r = json.loads((out / "train.report.json").read_text())
            res["conversion"][f"{fmt} --workers {w}"] = {k: r[k] for k in ("images_per_s", "images_per_s_per_worker",
                                                                           "seconds", "bytes_out", "samples")}
    threads = torch.get_num_threads()
    base = [f"data.batch_size={a.batch_size}", f"data.workers={a.workers}", "train.seed=0"]
    spec = MultiCropSpec.twist()
    for name, path, backend in (("torch", src, "torch"), ("torch-shards", a.out / f"shards-w{a.workers}", "torch"),
                                ("ffcv-canvas", a.out / f"ffcv-w{a.workers}", "ffcv")):
        pipe = build_pipeline(load_config(None, [*base, f"data.path={path}", f"data.backend={backend}"]), "train")
        full = None
        if a.full_batches:
            full = _time_epochs(lambda: (len(b) for b in pipe), pipe.set_epoch, 1, a.full_batches)
        if backend == "ffcv":
            stage = _time_epochs(lambda: (len(x[2]) for x in pipe.images()), pipe.set_epoch, a.epochs)
        else:
            pipe.augment = None                 # workers only read and decode (what they do with a GPU)
            stage = _time_epochs(lambda: (len(b) for b in pipe), pipe.set_epoch, a.epochs)
        res["loaders"][name] = {"cpu_stage": stage, "full_cpu": full}
        torch.set_num_threads(threads)
    views = ViewsPipeline(a.out / f"ffcv-w{a.workers}" / "train.beton", spec, a.batch_size, a.workers)
    res["loaders"]["ffcv-views"] = {"cpu_stage": _time_epochs(views.cpu_stage, views.set_epoch, a.epochs),
                                    "full_cpu": _time_epochs(views.__iter__, views.set_epoch, 1, a.full_batches)
                                    if a.full_batches else None}
    torch.set_num_threads(threads)
    res["date"] = time.strftime("%Y-%m-%d")
    (a.out / "bench.json").write_text(json.dumps(res, indent=1))
    ref = res["loaders"]["torch"]
    print("| loader | CPU stage samples/s | x torch | full on CPU samples/s | x torch | first-epoch extra s |")
    print("|---|---|---|---|---|---|")
    for name, r in res["loaders"].items():
        cells = []
        for part in ("cpu_stage", "full_cpu"):
            v = r[part]["samples_per_s"] if r[part] else None
            cells += [f"{v:,.1f}", f"{v / ref[part]['samples_per_s']:.2f}"] if v else ["-", "-"]
        first = r["full_cpu"] or r["cpu_stage"]
        print(f"| {name} | {' | '.join(cells)} | {first['warmup_extra_s']} |")
    print("\n| conversion | images/s | per worker | seconds |\n|---|---|---|---|")
    for name, r in res["conversion"].items():
        print(f"| {name} | {r['images_per_s']:,.0f} | {r['images_per_s_per_worker']:,.0f} | {r['seconds']} |")
    return 0

