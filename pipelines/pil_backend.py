"""The `pil` backend: the official TWIST recipe as CPU transforms (PIL + torchvision), one sample at a time in
DataLoader workers. It is the baseline the fast backends are measured against (tools/profiler.py) and a
reference for their statistics; it is not meant for real training runs.
"""
from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from pipelines.batch import Batch
from pipelines.filecheck import read_or_next, take_bad_files
from pipelines.sources import load_source
from pipelines.spec import MultiCropSpec, ViewGroup
from pipelines.order import EpochSampler, steps_per_epoch


class PILGaussianBlur:
    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    def __init__(self, p: float):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


def group_transform(g: ViewGroup, mean, std) -> T.Compose:
    """One view group as the official code composes it (bicubic crops, PIL blur and solarize)."""
    ops = [T.RandomResizedCrop(g.size, scale=g.scale, ratio=g.ratio, interpolation=T.InterpolationMode.BICUBIC),
           T.RandomHorizontalFlip(g.flip_p),
           T.RandomApply([T.ColorJitter(*g.jitter)], p=g.jitter_p),
           T.RandomGrayscale(g.gray_p)]
    if g.blur_p > 0:
        ops.append(T.RandomApply([PILGaussianBlur(g.blur_sigma)], p=g.blur_p))
    if g.solarize_p > 0:
        ops.append(PILSolarize(g.solarize_p))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


class MultiCropPIL(Dataset):
    def __init__(self, files, labels, spec: MultiCropSpec):
        self.files, self.labels = files, labels
        self.transforms = [group_transform(g, spec.mean, spec.std) for g in spec.view_groups()]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        """Sample i, or the next readable one when its file is not a readable image (noted for the report)."""
        return read_or_next(len(self.files), i, self._load, lambda j: self.files[j])

    def _load(self, i):
        with Image.open(self.files[i]) as im:   # by content: a PNG named .JPEG works; CMYK/gray -> RGB
            img = im.convert("RGB")
        return [t(img) for t in self.transforms], self.labels[i], i


def _collate(items):
    views, labels, idx = zip(*items)
    return ([torch.stack(v) for v in zip(*views)], torch.tensor(labels, dtype=torch.long),
            torch.tensor(idx, dtype=torch.long), take_bad_files())


class PILPipeline:
    def __init__(self, dataset, sampler, batch_size, workers, device, drop_last, channels_last, dtype):
        self.dataset, self.sampler, self.device = dataset, sampler, device
        self.batch_size, self.workers, self.drop_last = batch_size, workers, drop_last
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.dtype = dtype

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_step * self.batch_size)

    def __len__(self) -> int:
        return steps_per_epoch(len(self.sampler), self.batch_size, self.drop_last)

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, collate_fn=_collate,
                            num_workers=self.workers, drop_last=self.drop_last,
                            pin_memory=self.device.type == "cuda")
        for views, labels, idx, skipped in loader:
            views = [v.to(self.device, non_blocking=True).to(self.dtype, memory_format=self.fmt) for v in views]
            yield Batch(views, labels.to(self.device), idx.to(self.device), skipped)


def build_pil_pipeline(cfg, split, rank, world, device, spec=None, dtype=torch.float32) -> PILPipeline:
    files, labels = load_source(cfg.data.path, split)
    spec = spec or MultiCropSpec.from_config(cfg.augment)
    sampler = EpochSampler(len(files), rank, world, shuffle=True, seed=cfg.train.seed)
    return PILPipeline(MultiCropPIL(files, labels, spec), sampler, cfg.data.batch_size, cfg.data.workers, device,
                       cfg.data.drop_last, cfg.train.channels_last, dtype)
