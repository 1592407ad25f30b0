"""The `dali` backend: one NVIDIA DALI pipeline per rank reads, decodes (nvJPEG on the GPU) and cuts every view of
the spec (`dali_graph.py`); the PyTorch plugin's iterator hands the outputs over without a copy.

Sample order. DALI's own shuffling is either a small buffer (`random_shuffle`, `initial_fill` samples: batches
of a class-sorted ImageNet folder would stay class-correlated) or `shuffle_after_epoch`, whose permutation has a
fixed seed. Instead each epoch gets its own pipeline whose `fn.readers.file` reads an explicit file list: this
rank's part of the same seeded per-epoch permutation the torch backend uses (`EpochSampler`: global shuffle,
ranks take strided slices, padded by wrapping to equal length). So the reader runs unsharded and unshuffled
(`num_shards=1`, `random_shuffle=False`; `stick_to_shard` does not apply), the order is a pure function of
(train.seed, epoch, rank), identical to the torch backend's, and a mid-epoch resume (`set_epoch(e, start_step)`)
continues with exactly the unseen samples. Building a pipeline takes well under a second next to an epoch.
The reader's label output carries the dataset index, so every batch knows its samples' indices; labels are
looked up from the source's table.

Augmentation randomness is seeded per (train.seed, epoch, rank, start_step): views are reproducible for a given
run and position, but a run resumed mid-epoch draws fresh views for the rest of that epoch (the torch backend
reproduces those exactly).

Last batch: `data.drop_last` -> DROP, else PARTIAL (the reader pads the shard with its last sample, the iterator
trims it). Views arrive as (N, H, W, C) buffers and are returned as NCHW tensors in channels-last memory format
(a permuted view, no copy); float16 output is cast to bfloat16 on the device when the step wants bfloat16.
"""
from __future__ import annotations

import math
import warnings

import torch

from pipelines.batch import Batch
from pipelines.filecheck import check_files, replace_bad
from pipelines.order import EpochSampler, batch_seed, steps_per_epoch

__all__ = ["DaliPipeline", "FileSource", "build_dali_pipeline"]


def _import_dali():
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        raise ImportError("data.backend=dali needs NVIDIA DALI: pip install -e '.[dali]' "
                          "(nvidia-dali-cuda130)") from None


class FileSource:
    """Image files + labels (ImageNet-layout folder or file list, as `pipelines.sources.load_source`).

    A file DALI cannot read or decode stops the pipeline, so the list is checked first (`filecheck.check_files`:
    empty, not an image, truncated, a directory) and each bad entry delivers the next good sample instead (its
    image, label and index), as the torch backend does at run time; `bad` holds (path, reason) for the report."""

    def __init__(self, files: list[str], labels: list[int], check_threads: int = 1):
        if len(files) >= 2 ** 31:
            raise ValueError("dali backend: more than 2^31 files; the reader's label output is int32")
        bad = check_files(files, check_threads) if check_threads else {}
        self.bad = [(files[i], reason) for i, reason in sorted(bad.items())]
        self.take = replace_bad(files, bad)
        self.files, self.labels = files, torch.tensor(labels, dtype=torch.long)
        self.n = len(files)

    def per_rank(self, world: int) -> int:
        return math.ceil(self.n / world)

    def epoch_count(self, world: int, start: int) -> int:
        """Samples this rank reads in an epoch from sample `start` on (equal on every rank)."""
        return self.per_rank(world) - start

    def read(self, epoch: int, rank: int, world: int, shuffle: bool, seed: int, start: int):
        """Reader nodes (inside a pipeline definition): encoded images and their meta (the dataset index)."""
        import nvidia.dali.fn as fn
        sampler = EpochSampler(self.n, rank, world, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch, start)
        order = [self.take[i] for i in sampler]
        encoded, index = fn.readers.file(files=[self.files[i] for i in order], labels=order,
                                         random_shuffle=False, pad_last_batch=True, name="reader")
        return encoded, index

    def labels_indices(self, meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = meta.reshape(-1).long()
        return self.labels[idx], idx


class DaliPipeline:
    """Iterable of `Batch` for one split; `len()` is steps per epoch; `set_epoch(epoch, start_step)`."""

    def __init__(self, source, graph, batch_size: int, rank: int, world: int, device: torch.device,
                 shuffle: bool, seed: int, drop_last: bool, threads: int, prefetch: int,
                 out_dtype: torch.dtype, channels_last: bool):
        _import_dali()
        self.source, self.graph = source, graph
        self.batch_size, self.rank, self.world, self.device = batch_size, rank, world, device
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.threads, self.prefetch = threads, prefetch
        self.out_dtype, self.channels_last = out_dtype, channels_last
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def _steps(self, count: int) -> int:
        return steps_per_epoch(count, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return self._steps(self.source.epoch_count(self.world, 0)) - self.start_step

    def _build(self):
        from nvidia.dali import pipeline_def
        gpu = self.device.type == "cuda"
        start = self.start_step * self.batch_size
        args = (self.epoch, self.rank, self.world, self.shuffle, self.seed, start)

        @pipeline_def(enable_conditionals=True)
        def definition():
            encoded, meta = self.source.read(*args)
            return (*self.graph(encoded, gpu), meta)

        pipe = definition(batch_size=self.batch_size, num_threads=self.threads,
                          device_id=(self.device.index or 0) if gpu else None, prefetch_queue_depth=self.prefetch,
                          seed=batch_seed(self.seed, self.epoch, self.rank, [self.start_step]) % (2 ** 31 - 1))
        pipe.build()
        return pipe, self.source.epoch_count(self.world, start)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        if len(self) <= 0:            # nothing left of this epoch (or fewer samples than one full batch)
            self.start_step = 0
            return
        pipe, count = self._build()
        steps = self._steps(count)
        names = [f"v{i}" for i in range(pipe.num_outputs - 1)] + ["meta"]
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        with warnings.catch_warnings():  # `size` is our own per-rank count, equal on every rank
            warnings.filterwarnings("ignore", message="Please set `reader_name`")
            it = DALIGenericIterator([pipe], names, size=count, last_batch_policy=policy,
                                     last_batch_padded=True, auto_reset=False, prepare_first_batch=False)
        skipped = list(self.source.bad)   # found at start-up (FileSource), reported with the first batch
        try:
            for _, out in zip(range(steps), it):
                batch = self._batch(out[0], names)
                batch.skipped, skipped = skipped, []
                yield batch
        finally:
            del it, pipe
        self.start_step = 0

    def _batch(self, out: dict, names: list[str]) -> Batch:
        labels, idx = self.source.labels_indices(out["meta"])
        if self.device.type == "cuda":       # one pinned buffer, one asynchronous copy
            both = torch.stack([labels, idx]).pin_memory().to(self.device, non_blocking=True)
            labels, idx = both[0], both[1]
        views = []
        for name in names[:-1]:
            v = out[name].permute(0, 3, 1, 2)            # NHWC buffer -> NCHW, channels-last strides
            v = v.to(self.device, self.out_dtype, non_blocking=True)
            views.append(v if self.channels_last else v.contiguous())
        return Batch(views, labels, idx)


def build_dali_pipeline(cfg, split: str, rank: int, world: int, device: torch.device, train: bool,
                        spec=None, dtype: torch.dtype = torch.float32) -> DaliPipeline:
    _import_dali()
    from functools import partial

    from pipelines import dali_graph
    from pipelines.sources import load_source
    from pipelines.spec import MultiCropSpec
    d, a = cfg.data, cfg.augment
    from pipelines.dali_shards import ShardSource
    from pipelines.shards import find_shards
    shards = find_shards(d.path, split)
    if shards is not None:
        source = ShardSource(shards, d.dali.shuffle_buffer)
    else:
        source = FileSource(*load_source(d.path, split), check_threads=d.dali.check_threads)
    mixed = dali_graph.mixed_decoder_args(d.dali.hw_decoder_load, d.dali.preallocate, d.dali.memory_padding)
    if train:
        spec = spec or MultiCropSpec.from_config(a)
        graph = partial(_train_graph, spec=spec, dtype=dali_graph.dali_out_dtype(dtype),
                        fused=d.dali.decode == "fused", mixed_args=mixed)
        return DaliPipeline(source, graph, d.batch_size, rank, world, device, True, cfg.train.seed,
                            d.drop_last, d.dali.threads, d.dali.prefetch, dtype, cfg.train.channels_last)
    graph = partial(_eval_graph, resize=cfg.eval.resize, crop=cfg.eval.crop, mean=a.mean, std=a.std, mixed_args=mixed)
    return DaliPipeline(source, graph, d.batch_size, rank, world, device, False, 0, False, d.dali.threads,
                        d.dali.prefetch, torch.float32, cfg.train.channels_last)


def _train_graph(encoded, gpu, spec, dtype, fused, mixed_args):
    from pipelines.dali_graph import multicrop
    return multicrop(encoded, spec, dtype, gpu, fused, mixed_args)


def _eval_graph(encoded, gpu, resize, crop, mean, std, mixed_args):
    import nvidia.dali.types as types

    from pipelines.dali_graph import eval_view
    return [eval_view(encoded, resize, crop, mean, std, types.FLOAT, gpu, mixed_args)]
