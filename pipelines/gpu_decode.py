"""Batched JPEG decoding on the GPU (nvJPEG through `torchvision.io.decode_jpeg`), with a per-sample CPU
fallback so that nothing is dropped, and a prefetcher that prepares the next batch on a side CUDA stream while
the current one trains.

Which samples go to nvJPEG is decided from the file's bytes, not the name: baseline/progressive JPEGs with 1 or 3
components that end in an end-of-image marker do; PNGs named .JPEG, CMYK/YCCK JPEGs (4 components), truncated
JPEGs (no end marker: the CPU decoder reports them, nvJPEG might not) and anything else are decoded on the CPU
(`sources.decode_rgb`) and copied over. If nvJPEG still rejects a batch, each of its samples is retried alone,
and the ones that fail again take the CPU path.

Stream ordering. torchvision's `decode_jpeg(device=cuda)` allocates its outputs on the caller's current stream
but writes them from nvJPEG's own pool stream, which never waits for the caller's stream: a block the caching
allocator hands out may still have reads queued on the caller's stream (the previous batch's augmentation, on
the prefetcher's side stream), and nvJPEG would overwrite it under them. `decode_batch` therefore finishes the
current stream's pending work first (`stream_barrier`). On the prefetch path this blocks only the prefetcher,
and the batched decode blocks the host anyway (it synchronises nvJPEG's stream). torchvision makes the caller's
stream wait for the decode afterwards itself. (torchcodec decodes on the caller's stream; it is not a
dependency of the project.)
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from pipelines.filecheck import TAIL, jpeg_complete
from pipelines.sources import decode_rgb

_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_components(data: torch.Tensor | bytes) -> int:
    """Number of colour components declared by a JPEG's frame header (1 gray, 3 YCbCr, 4 CMYK/YCCK);
    0 when the bytes are not a JPEG or the header is unreadable."""
    buf = bytes(data[:65536].numpy()) if isinstance(data, torch.Tensor) else bytes(data[:65536])
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return 0
    i = 2
    while i + 4 <= len(buf):
        if buf[i] != 0xFF:
            return 0
        marker = buf[i + 1]
        if marker == 0xFF:          # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = (buf[i + 2] << 8) | buf[i + 3]
        if marker in _SOF_MARKERS:
            return buf[i + 9] if i + 9 < len(buf) else 0
        if marker == 0xDA:          # start of scan before any frame header
            return 0
        i += 2 + length
    return 0


def ends_complete(data: torch.Tensor) -> bool:
    """Whether a JPEG's bytes end in its end-of-image marker (FF D9), allowing a little trailing padding."""
    return jpeg_complete(bytes(data[-TAIL:].numpy()))


def _to_rgb(img: torch.Tensor) -> torch.Tensor:
    return img.expand(3, -1, -1) if img.shape[0] == 1 else img


def stream_barrier(device: torch.device) -> None:
    """Block the host until the current CUDA stream of `device` has run all its queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def decode_batch(datas: list[torch.Tensor], device: torch.device, names: list[str] | None = None,
                 on_error=None) -> list[torch.Tensor]:
    """Decode encoded images (uint8 byte tensors) to uint8 (3, H, W) tensors on `device`. A sample no decoder
    can read raises ValueError naming it — or, with `on_error(name, exc)`, is reported through it and replaced
    by another image of the batch."""
    names = names or [f"<sample {i}>" for i in range(len(datas))]
    out: list[torch.Tensor | None] = [None] * len(datas)
    gpu = [i for i, d in enumerate(datas) if jpeg_components(d) in (1, 3) and ends_complete(d)]
    if gpu:
        stream_barrier(device)
        try:
            imgs = decode_jpeg([datas[i] for i in gpu], mode=ImageReadMode.RGB, device=device)
            for i, img in zip(gpu, imgs):
                out[i] = _to_rgb(img)
        except RuntimeError:
            for i in gpu:            # isolate the sample(s) nvJPEG rejects
                try:
                    out[i] = _to_rgb(decode_jpeg(datas[i], mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out[i] = None
    bad = []
    for i, img in enumerate(out):
        if img is None:
            try:
                img = decode_rgb(bytes(datas[i].numpy()), names[i])
                out[i] = img.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else img
            except ValueError as exc:
                if on_error is None:
                    raise
                on_error(names[i], exc)
                bad.append(i)
    good = [img for img in out if img is not None]
    if bad and not good:
        raise ValueError(f"no image of the batch could be decoded (first: '{names[bad[0]]}'); check the dataset")
    for k, i in enumerate(bad):
        out[i] = good[k % len(good)]
    return out


class DevicePrefetcher:
    """Iterate `produce(item)` over `source`, one batch ahead: on CUDA the next batch is produced on a side
    stream while the caller's kernels for the current one run on the default stream. On CPU it is a plain map.
    """

    def __init__(self, source, produce, device: torch.device):
        self.source, self.produce, self.device = source, produce, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _make(self, item):
        if self.stream is None:
            return self.produce(item)
        with torch.cuda.stream(self.stream):
            return self.produce(item)

    def _hand_over(self, batch):
        if self.stream is None:
            return batch
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for t in [*batch.views, batch.labels, batch.indices]:
            t.record_stream(main)    # memory made on the side stream stays alive while the main stream uses it
        return batch

    def __iter__(self):
        it = iter(self.source)
        try:
            nxt = self._make(next(it))
        except StopIteration:
            return
        while nxt is not None:
            cur = self._hand_over(nxt)
            try:
                nxt = self._make(next(it))
            except StopIteration:
                nxt = None
            yield cur
