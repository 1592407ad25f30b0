"""The `ffcv` backend: reads `DATA/SPLIT.beton` (written by tools/convert.py) with `ffcv.loader.Loader` and yields
the same `Batch` as the other backends.

Training: FFCV's threads decode each image whole, once, into a padded canvas (`CanvasDecoder`); the batched
multi-crop engine (`augment.engine.MultiCropAugment`) cuts every view from it — on the GPU when training on CUDA. We
measured this against FFCV's own crop decoders (one decode, all crops on the CPU) and kept it: see BENCHMARKS.md.
It also keeps the augmentation identical to the other backends: same spec, same seeded per-batch randomness.
Evaluation: FFCV's `CenterCropRGBImageDecoder` (centre crop + resize), normalized in torch.

Order: an FFCV `TraversalOrder` driven by the torch backend's `EpochSampler` — a per-epoch seeded RANDOM order,
sharded per rank (padded like DistributedSampler), resumable mid-epoch — so no process group is needed and both
backends visit samples in the same order for the same seed.

FFCV facts that shape this file: the Loader removes the decoder from the op lists it is given (fresh lists per
Loader); batches are views into reused buffers (valid until the next batch); `Loader(num_workers=n)` sets
`torch.set_num_threads(n)`.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, CenterCropRGBImageDecoder, SimpleRGBImageDecoder
from ffcv.libffcv import imdecode
from ffcv.loader import Loader
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.reader import Reader
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder

from pipelines import augment_on_device
from pipelines.batch import Batch
from pipelines.augment.engine import MultiCropAugment
from pipelines.spec import MultiCropSpec
from pipelines.order import EpochSampler, EpochSteps, batch_seed


def compile_image_reader(decoder: SimpleRGBImageDecoder):
    """`read_image(field, storage_state, temp)` for a decoder's generated code, compiled like it: the sample of
    metadata row `field` as an (h, w, 3) uint8 array, JPEG-decoded into `temp` (one sample's h*w*3 bytes) or, for
    a raw sample, a view of the stored bytes."""
    mem_read, jpg = decoder.memory_read, IMAGE_MODES["jpg"]
    imdecode_c = Compiler.compile(imdecode)

    def read_image(field, storage_state, temp):
        data = mem_read(field["data_ptr"], storage_state)
        h, w = np.uint32(field["height"]), np.uint32(field["width"])
        n = np.int64(h) * np.int64(w) * 3
        if field["mode"] == jpg:
            buf = temp[:n]
            imdecode_c(data, buf, h, w, h, w, 0, 0, 1, 1, False, False)
            return buf.reshape(h, w, 3)
        return data[:n].reshape(h, w, 3)

    return Compiler.compile(read_image)


class CanvasDecoder(SimpleRGBImageDecoder):
    """Decode each image whole into the top-left of a (Hmax, Wmax, 3) canvas (the largest image of the file),
    copying its last row and column once into the padding (the engine reads only inside each image, given its
    size; the copy is harmless). Works for variable-size datasets, JPEG and raw samples."""

    def declare_state_and_memory(self, previous_state):
        h, w = int(self.metadata["height"].max()), int(self.metadata["width"].max())
        u8 = np.dtype("<u1")
        return (replace(previous_state, jit_mode=True, shape=(h, w, 3), dtype=u8),
                (AllocationQuery((h, w, 3), u8), AllocationQuery((h * w * 3,), u8)))

    def generate_code(self):
        read_image, my_range = compile_image_reader(self), Compiler.get_iterator()

        def decode(batch_indices, my_storage, metadata, storage_state):
            canvas, temp = my_storage
            H, W = canvas.shape[1], canvas.shape[2]
            for i in my_range(len(batch_indices)):
                img = read_image(metadata[batch_indices[i]], storage_state, temp[i])
                h, w = img.shape[0], img.shape[1]
                out = canvas[i]
                out[:h, :w] = img
                if w < W:
                    out[:h, w] = img[:, w - 1]
                if h < H:
                    out[h, :min(w + 1, W)] = out[h - 1, :min(w + 1, W)]
            return canvas[:len(batch_indices)]

        decode.is_parallel = True
        return decode


class EpochOrder(TraversalOrder):
    """FFCV traversal order from an `EpochSampler` (its epoch and start are set by the pipeline, not by FFCV's
    epoch counter). `last` is the order of the epoch being iterated: batch k holds last[k*B:(k+1)*B]."""

    def __init__(self, sampler: EpochSampler, batch_size: int, drop_last: bool):
        self.epoch_sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.last = np.zeros(0, dtype=np.uint64)

    def __call__(self, loader):          # Loader(order=<instance>) calls order(loader)
        super().__init__(loader)
        return self

    def sample_order(self, epoch: int):
        idx = list(self.epoch_sampler)
        if self.drop_last:
            idx = idx[:len(idx) // self.batch_size * self.batch_size]
        self.last = np.asarray(idx, dtype=np.uint64)
        return self.last


class FFCVPipeline(EpochSteps):
    """Iterable of `Batch` for one split; `len()` is steps per epoch for this rank."""

    def __init__(self, path: Path, sampler: EpochSampler, batch_size: int, workers: int, os_cache: bool,
                 drop_last: bool, device: torch.device, make_ops, finish, seed: int, rank: int):
        self.path, self.sampler, self.batch_size, self.drop_last = path, sampler, batch_size, drop_last
        self.workers, self.os_cache, self.device = max(1, workers), os_cache, device
        self.make_ops, self.finish, self.seed, self.rank = make_ops, finish, seed, rank
        self.order = EpochOrder(sampler, batch_size, drop_last)
        self.epoch, self.start_step = 0, 0
        self._loader: Loader | None = None

    def loader(self) -> Loader:
        if self._loader is None:
            self._loader = Loader(str(self.path), batch_size=self.batch_size, num_workers=self.workers,
                                  os_cache=self.os_cache, order=self.order, drop_last=False, seed=self.seed,
                                  pipelines={"image": self.make_ops(), "label": None})
            meta, names = self._loader.reader.metadata, self._loader.reader.field_names
            image, label = meta[f"f{names.index('image')}"], meta[f"f{names.index('label')}"]
            self.labels = torch.from_numpy(label.astype(np.int64))
            self.sizes = torch.from_numpy(np.stack([image["height"], image["width"]], 1).astype(np.int64))
        return self._loader

    def images(self):
        """Per batch: (uint8 NCHW images on the device — a view into FFCV's reused buffers, valid until the next
        batch —, (N, 2) image sizes, labels, dataset indices)."""
        if len(self) == 0:
            return
        loader = self.loader()
        it = iter(loader)
        order = torch.from_numpy(self.order.last.astype(np.int64))
        start = 0
        for (images,) in it:
            idx = order[start:start + images.shape[0]]
            start += images.shape[0]
            yield images, self.sizes[idx], self.labels[idx], idx

    def __iter__(self):
        for images, sizes, labels, idx in self.images():
            views = [v.to(self.device, non_blocking=True) for v in self.finish(images, sizes, idx, self.epoch)]
            yield Batch(views, labels.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True))
        self.set_epoch(self.epoch, 0)


def _device_ops(device: torch.device) -> list:
    return [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []


def build_ffcv_pipeline(cfg, split: str, rank: int, world: int, device: torch.device, train: bool,
                        spec: MultiCropSpec | None = None, dtype: torch.dtype = torch.float32) -> FFCVPipeline:
    path = Path(cfg.data.path) / f"{split}.beton"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found: data.backend=ffcv reads DATA/SPLIT.beton; write it with "
                                f"`python tools/convert.py SRC {cfg.data.path} --format ffcv`")
    a, seed = cfg.augment, cfg.train.seed
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    n = int(Reader(str(path)).num_samples)
    if not train:
        mean = torch.tensor(a.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(a.std, device=device).view(1, 3, 1, 1) * 255

        def make_ops():
            return [CenterCropRGBImageDecoder((cfg.eval.crop, cfg.eval.crop), ratio=cfg.eval.crop / cfg.eval.resize),
                    ToTensor(), *_device_ops(device), ToTorchImage(channels_last=True)]

        def finish(images, sizes, idx, epoch):
            return [((images.float() - mean) / std).contiguous(memory_format=fmt)]

        return FFCVPipeline(path, EpochSampler(n, rank, world, shuffle=False), cfg.data.batch_size,
                            cfg.data.workers, cfg.data.ffcv.os_cache, False, device, make_ops, finish, seed, rank)

    augment = MultiCropAugment(spec or MultiCropSpec.from_config(a), out_dtype=dtype,
                               channels_last=cfg.train.channels_last, backend=cfg.train.compile_backend)
    on_device = augment_on_device(cfg, device)

    def make_ops():
        return [CanvasDecoder(), ToTensor(), *(_device_ops(device) if on_device else []),
                ToTorchImage(channels_last=True)]

    def finish(images, sizes, idx, epoch):
        gen = torch.Generator().manual_seed(batch_seed(seed, epoch, rank, idx))
        return augment(images, generator=gen, sizes=sizes)

    return FFCVPipeline(path, EpochSampler(n, rank, world, shuffle=True, seed=seed), cfg.data.batch_size,
                        cfg.data.workers, cfg.data.ffcv.os_cache, cfg.data.drop_last, device, make_ops, finish,
                        seed, rank)
