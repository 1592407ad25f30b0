"""The .beton stage of tools/convert.py: FFCV's `DatasetWriter` over the files the scan accepted.

Fields follow FFCV's ImageNet recipe: `image` = RGBImageField(write_mode='proportion', max_resolution,
jpeg_quality, compress_probability) — each image stored as JPEG with that probability, else as raw pixels —
and `label` = IntField.
"""
from __future__ import annotations

import functools
import multiprocessing as mp
import threading
from pathlib import Path

import ffcv.writer as ffcv_writer
import numpy as np
import torch
from ffcv.fields import IntField, RGBImageField

from tools.imageprep import load_clean

MIN_PAGE = 8 << 20      # FFCV's default page size; a sample must fit in one page


def beton_fields(max_size: int, quality: int, compress_prob: float) -> dict:
    return {"image": RGBImageField(write_mode="proportion", max_resolution=max_size, jpeg_quality=quality,
                                   compress_probability=compress_prob),
            "label": IntField()}


def page_size_for(max_size: int) -> int:
    page = MIN_PAGE
    while page < 3 * max_size * max_size + 4096:
        page *= 2
    return page


class _Source:
    """What DatasetWriter's processes index: (HWC uint8 RGB array, label).

    It never raises — an exception inside a DatasetWriter process leaves the writer waiting forever — so a file
    that fails here (it decoded in the scan, so this means it changed since) is logged to `failures`, written
    as a 1x1 placeholder, and the caller discards the output."""

    def __init__(self, root: Path, samples: list[tuple[str, int]], max_size: int, seed: int, counter, failures):
        self.root, self.samples, self.max_size, self.seed = root, samples, max_size, seed
        self.counter, self.failures, self._threads_set = counter, failures, False

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if not self._threads_set:
            torch.set_num_threads(1)
            self._threads_set = True
        rel, label = self.samples[i]
        # RGBImageField draws np.random.rand() to choose JPEG or raw: seed it per sample so that the choice does
        # not depend on which process wrote which chunk.
        np.random.seed((self.seed * 1_000_003 + i) % (2 ** 32))
        try:
            data = (self.root / rel).read_bytes()
            img, _ = load_clean(data, rel, self.max_size)
            arr = img.permute(1, 2, 0).contiguous().numpy()
        except Exception as exc:  # noqa: BLE001 — see the class docstring
            with open(self.failures, "a") as f:
                f.write(f"{i}\t{type(exc).__name__}: {exc}\n".replace("\n", " ").rstrip() + "\n")
            arr = np.zeros((1, 1, 3), np.uint8)
        with self.counter.get_lock():
            self.counter.value += 1
        return arr, label


def write_beton(path: Path, root: Path, samples: list[tuple[str, int]], *, max_size: int, quality: int,
                compress_prob: float, workers: int, seed: int, on_progress) -> list[tuple[int, str]]:
    """Write `samples` (relative path, label) from `root` to `path`; returns [(sample position, reason)] for
    files that failed while writing (the file is then unusable). `on_progress(done)` is called from a thread."""
    counter = mp.Value("Q", 0)
    failures = path.with_name(path.name + ".failures")
    failures.unlink(missing_ok=True)
    writer = ffcv_writer.DatasetWriter(str(path), beton_fields(max_size, quality, compress_prob),
                           page_size=page_size_for(max_size), num_workers=max(1, workers))
    stop = threading.Event()

    def poll():
        while not stop.wait(0.25):
            on_progress(counter.value)

    thread = threading.Thread(target=poll, daemon=True)
    own_bar = ffcv_writer.tqdm
    ffcv_writer.tqdm = functools.partial(own_bar, disable=True)   # the caller draws the progress bar
    thread.start()
    try:
        writer.from_indexed_dataset(_Source(root, samples, max_size, seed, counter, failures),
                                    chunksize=max(1, min(100, len(samples) // (4 * max(1, workers)))))
    finally:
        stop.set()
        thread.join()
        ffcv_writer.tqdm = own_bar
    on_progress(counter.value)
    if not failures.is_file():
        return []
    out = [(int(i), reason) for i, reason in (line.split("\t", 1) for line in failures.read_text().splitlines())]
    failures.unlink()
    return out
