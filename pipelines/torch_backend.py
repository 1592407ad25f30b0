"""The `torch` backend: DataLoader workers read (and, on CPU, decode) the files; the batched multi-crop engine
(`augment.engine.MultiCropAugment`) cuts all views — inside the workers when augmenting on CPU, or in the main
process on the GPU after nvJPEG decoding, where it is fastest.

Randomness is a function of (seed, epoch, rank, the batch's sample indices), so a run is reproducible whatever the number of
workers, and a resumed run sees the same views as an uninterrupted one.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from pipelines import augment_on_device
from pipelines.batch import Batch, EncodedImages
from pipelines.augment.engine import MultiCropAugment
from pipelines.gpu_decode import DevicePrefetcher, decode_batch
from pipelines.order import EpochSampler, EpochSteps, batch_seed
from pipelines.filecheck import note_bad_file, take_bad_files
from pipelines.sources import ImageDataset, load_source
from pipelines.shards import ShardDataset, find_shards
from pipelines.spec import MultiCropSpec


class _Collate:
    """Stacks labels/indices; with an engine attached (CPU augmentation) it also cuts the views. Undecoded bytes
    (GPU decoding) leave the worker as one flat tensor plus offsets (`EncodedImages`). The files that could not
    be read while making the batch leave with it (last item)."""

    def __init__(self, augment: MultiCropAugment | None, seed: int, rank: int, epoch: int, packed: bool = False):
        self.augment, self.seed, self.rank, self.epoch, self.packed = augment, seed, rank, epoch, packed

    def __call__(self, items):
        imgs, labels, idx = zip(*items)
        labels_t, idx_t = torch.tensor(labels, dtype=torch.long), torch.tensor(idx, dtype=torch.long)
        if self.augment is None:
            if self.packed:                      # encoded bytes, decoded on the GPU
                return EncodedImages.pack(list(imgs)), labels_t, idx_t, take_bad_files()
            return list(imgs), labels_t, idx_t, take_bad_files()
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, self.rank, idx))
        return self.augment(list(imgs), generator=gen), labels_t, idx_t, take_bad_files()


class TorchPipeline(EpochSteps):
    """Iterable of `Batch` for one split; `len()` is steps per epoch.

    Three placements of the work, chosen by `build_torch_pipeline`:
    - CPU: workers decode and cut the views (the engine runs inside the workers);
    - CPU decode + device augment: workers decode, the engine runs on the GPU;
    - device decode + device augment: workers only read bytes; nvJPEG decodes, the engine runs on the GPU,
      one batch ahead on a side stream (`DevicePrefetcher`).
    """

    def __init__(self, dataset: ImageDataset, sampler: EpochSampler, batch_size: int, workers: int,
                 device: torch.device, augment: MultiCropAugment, augment_on_device: bool, drop_last: bool,
                 seed: int, rank: int, max_side: int = 0):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.batch_size, self.drop_last, self.workers = batch_size, drop_last, workers
        self.augment, self.augment_on_device = augment, augment_on_device
        self.seed, self.rank, self.max_side = seed, rank, max_side
        self.epoch, self.start_step = 0, 0

    def _loader(self) -> DataLoader:
        collate = _Collate(None if self.augment_on_device else self.augment, self.seed, self.rank, self.epoch,
                           packed=not self.dataset.decode)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=collate,
                          num_workers=self.workers, drop_last=self.drop_last,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          prefetch_factor=4 if self.workers > 0 else None)

    def _on_device(self, item) -> Batch:
        payload, labels, idx, skipped = item
        if self.dataset.decode:
            imgs = [t.to(self.device, non_blocking=True) for t in payload]
        else:
            imgs = decode_batch(payload.split(), self.device, [self.dataset.files[i] for i in idx.tolist()],
                                on_error=note_bad_file)
        imgs = cap_size(imgs, self.max_side)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, self.rank, idx))
        views = self.augment(imgs, generator=gen)
        return Batch(views, labels.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True),
                     skipped + take_bad_files())

    def _from_workers(self, item) -> Batch:
        views, labels, idx, skipped = item
        return Batch([v.to(self.device, non_blocking=True) for v in views],
                     labels.to(self.device, non_blocking=True), idx.to(self.device, non_blocking=True), skipped)

    def __iter__(self):
        if self.augment_on_device:
            yield from DevicePrefetcher(self._loader(), self._on_device, self.device)
        else:
            yield from map(self._from_workers, self._loader())
        self.start_step = 0
        self.sampler.set_epoch(self.epoch, 0)


def cap_size(images: list[torch.Tensor], max_side: int) -> list[torch.Tensor]:
    """Downscale (antialiased) the rare images whose longer side exceeds `max_side`, so one huge photo does not
    blow up the padded canvas of the whole batch. Crops are relative, so their distribution is unchanged."""
    if max_side <= 0:
        return images
    out = []
    for im in images:
        h, w = im.shape[-2:]
        if max(h, w) > max_side:
            s = max_side / max(h, w)
            im = TF.resize(im, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)
        out.append(im)
    return out


class EvalTransform:
    """Resize the shorter side, centre crop, normalize: the standard evaluation view."""

    def __init__(self, resize: int, crop: int, mean, std):
        self.resize, self.crop, self.mean, self.std = resize, crop, list(mean), list(std)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        img = TF.resize(img, [self.resize], antialias=True)
        img = TF.center_crop(img, [self.crop, self.crop])
        return TF.normalize(img.float().div_(255.0), self.mean, self.std)


def _eval_collate(items):
    imgs, labels, idx = zip(*items)
    return (torch.stack(imgs), torch.tensor(labels, dtype=torch.long), torch.tensor(idx, dtype=torch.long),
            take_bad_files())


class EvalPipeline:
    """Deterministic single-view batches (views=[images]) for feature extraction; no shuffling, nothing
    dropped; ranks see disjoint shards padded to equal length (use `indices` to de-duplicate)."""

    def __init__(self, dataset, sampler, batch_size, workers, device, channels_last: bool = True):
        self.sampler, self.device, self.channels_last = sampler, device, channels_last
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=_eval_collate,
                                 num_workers=workers, pin_memory=device.type == "cuda")

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        for imgs, labels, idx, skipped in self.loader:
            imgs = imgs.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
            yield Batch([imgs], labels.to(self.device), idx.to(self.device), skipped)


def build_torch_pipeline(cfg, split: str, rank: int, world: int, device: torch.device, train: bool,
                         spec: MultiCropSpec | None = None, dtype: torch.dtype = torch.float32,
                         subset: list[int] | None = None):
    shards = find_shards(cfg.data.path, split)
    if shards and subset is not None:
        raise ValueError(f"label subsets need an image folder or file list; '{cfg.data.path}' holds tar shards")
    files, labels = (None, None) if shards else load_source(cfg.data.path, split)
    if subset is not None:
        files, labels = [files[i] for i in subset], [labels[i] for i in subset]

    def dataset(transform=None, decode=True):
        return ShardDataset(shards, transform, decode) if shards else ImageDataset(files, labels, transform, decode)

    a = cfg.augment
    if not train:
        ds = dataset(EvalTransform(cfg.eval.resize, cfg.eval.crop, a.mean, a.std))
        sampler = EpochSampler(len(ds), rank, world, shuffle=False)
        return EvalPipeline(ds, sampler, cfg.data.batch_size, cfg.data.workers, device, cfg.train.channels_last)
    spec = spec or MultiCropSpec.from_config(a)
    d = cfg.data
    on_device = augment_on_device(cfg, device)
    decode_on_device = on_device and d.decode_device in ("auto", "cuda")
    augment = MultiCropAugment(spec, out_dtype=dtype, channels_last=cfg.train.channels_last,
                               backend=cfg.train.compile_backend)
    ds = dataset(decode=not decode_on_device)
    sampler = EpochSampler(len(ds), rank, world, shuffle=True, seed=cfg.train.seed)
    return TorchPipeline(ds, sampler, d.batch_size, d.workers, device, augment, on_device, d.drop_last,
                         cfg.train.seed, rank, a.max_side)
