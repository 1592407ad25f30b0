"""Antialiased crop + resize straight from uint8 images of different sizes, batched, with static shapes.

All images of a batch sit in one flat buffer; each crop names its image by (offset, height, width, channel
stride, row stride, column stride), so no padded canvas is ever built and a channels-last canvas (FFCV) is read
in place. The resize is torchvision's antialiased bilinear (PIL's triangle filter, `antialias=True`) applied to
the integer crop box, separably: rows first into a (M, 3, S, Wc) buffer holding only the crop's columns, then
columns. Taps outside the box get weight 0, as when torchvision resizes the cropped image.

Tap counts (`ky`, `kx`) and the buffer width `wc` are Python ints chosen on the host from the CPU-side boxes
(`tap_counts`), so every tensor shape is static: the same function runs eagerly (CPU) or under torch.compile.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["round_up", "source_meta", "tap_counts", "filter_taps", "crop_resize", "resized_crops"]


def round_up(n: int, per_octave: int, floor: int = 1) -> int:
    """`n` rounded up to a grid with `per_octave` points between consecutive powers of two (and multiples of
    `floor` below that): at most 1/per_octave of waste, and log2(range) * per_octave distinct values, so a
    compiled function fed these sizes sees a small, bounded number of shapes whatever the data."""
    step = max(floor, 1 << max(0, (max(n, 1) - 1).bit_length() - 1 - (per_octave.bit_length() - 1)))
    return step * -(-n // step)


def source_meta(images) -> tuple[Tensor, Tensor]:
    """A list of CHW images -> (flat buffer on their device, (N, 7) int64 CPU meta), or an NCHW tensor (any dense
    memory format) -> (a flat view of its storage, meta). Meta rows: offset, height, width, channel/row/column
    stride, row capacity (pixels a row can be read past its start without leaving the buffer: the canvas width;
    a list's flat buffer ends with one row of padding for the same reason). Only shapes and strides are read,
    so nothing waits for the device. The buffer's length changes with every batch: compiled callers mark it
    dynamic (`torch._dynamo.mark_dynamic(flat, 0)`), or each batch would be a recompilation."""
    if isinstance(images, Tensor):
        n, c, h, w = images.shape
        if not (images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last)):
            images = images.contiguous()
        s = images.stride()
        span = 1 + sum((d - 1) * st for d, st in zip(images.shape, s))
        flat = images.as_strided((span,), (1,))
        meta = torch.tensor([[i * s[0], h, w, s[1], s[2], s[3], w] for i in range(n)], dtype=torch.int64)
        return flat, meta
    rows, off = [], 0
    for im in images:
        c, h, w = im.shape
        rows.append([off, h, w, h * w, w, 1, w])
        off += c * h * w
    pad = images[0].new_zeros(max(r[2] for r in rows))
    flat = torch.cat([im.reshape(-1) for im in images] + [pad])
    return flat, torch.tensor(rows, dtype=torch.int64)


def tap_counts(boxes: Tensor, size: int, bucket: bool = False) -> tuple[int, int, int]:
    """(ky, kx, wc) for CPU boxes (M, 4) x1, y1, x2, y2 resized to `size`: the most filter taps any output row /
    column needs and the widest crop. `bucket` rounds them up so that a compiled caller sees few distinct shapes:
    taps to 2^k + 1, the width with `round_up(wc, 2, 64)` (64, 128, 192, 256, 384, 512, 768, ...: 2 per octave)."""
    bw, bh = (boxes[:, 2] - boxes[:, 0]).max().item(), (boxes[:, 3] - boxes[:, 1]).max().item()
    ky, kx = (math.ceil(2 * max(1.0, b / size)) + 2 for b in (bh, bw))
    wc = int(bw)
    if bucket:
        ky, kx = (2 ** math.ceil(math.log2(k - 1)) + 1 for k in (ky, kx))
        wc = round_up(wc, 2, 64)
    return ky, kx, wc


def filter_taps(length: Tensor, size: int, k: int) -> tuple[Tensor, Tensor]:
    """Triangle-filter taps resizing `length` (M,) source pixels to `size`: (M, size, k) int64 indices into
    0 .. length-1 and float32 weights (rows sum to 1), exactly aten's antialiased bilinear (upsample_*_aa)."""
    length = length.float()
    scale = length / size
    support = scale.clamp_min(1.0)[:, None, None]
    centre = scale[:, None, None] * (torch.arange(size, device=length.device, dtype=torch.float32) + 0.5)[:, None]
    lo = (centre - support + 0.5).trunc().clamp_min(0)
    hi = torch.minimum((centre + support + 0.5).trunc(), length[:, None, None])
    t = lo + torch.arange(k, device=length.device, dtype=torch.float32)
    w = (1 - ((t - centre + 0.5) / support).abs()).clamp_min(0) * (t < hi)
    w = w / w.sum(-1, keepdim=True)
    return torch.minimum(t, length[:, None, None] - 1).long(), w


def crop_resize(flat: Tensor, meta: Tensor, boxes: Tensor, flip: Tensor | None, size: int, ky: int, kx: int,
                wc: int, xstep: int, tmp_dtype=torch.float32, fused: bool = False) -> Tensor:
    """(M, 3, size, size) float32 crops of `flat` images (values in the source's units).

    meta: (M, 7) int64 rows of `source_meta` on flat's device (one per crop), `xstep` their column stride (the
    same for all images of a call: 1 for a list, the canvas's otherwise; a Python int); boxes: (M, 4) float
    integer boxes; flip: (M,) bool, mirrored horizontally where True (folded into the column taps: free). `tmp_dtype` is the
    dtype of the row-resized buffer (float16 halves its traffic on a GPU). Pass 1 reads, for every (crop,
    channel, output row, tap), one window of `wc` pixels of a source row: a row gather from an overlapping
    strided view of the buffer. `fused` (for torch.compile) writes each pass as a sum over taps that Inductor
    fuses into one kernel; eagerly, pass 2 is a batched matmul instead (fast on a CPU)."""
    m, dev = boxes.shape[0], flat.device
    off, h, w, cs, rs, xs, cap = meta.unbind(1)
    x1, y1 = boxes[:, 0].long(), boxes[:, 1].long()
    iy, wy = filter_taps(boxes[:, 3] - boxes[:, 1], size, ky)
    ix, wx = filter_taps(boxes[:, 2] - boxes[:, 0], size, kx)
    if flip is not None:
        f = flip[:, None, None]
        ix, wx = torch.where(f, ix.flip(1), ix), torch.where(f, wx.flip(1), wx)
    col0 = torch.minimum(x1, (cap - wc).clamp_min(0))        # windows stay inside a row or its padding
    ix = ix + (x1 - col0)[:, None, None]
    windows = flat.as_strided((flat.numel() - (wc - 1) * xstep, wc), (1, xstep))
    if fused:
        start = (off[:, None, None, None] + torch.arange(3, device=dev)[:, None, None] * cs[:, None, None, None]
                 + ((y1[:, None, None] + iy) * rs[:, None, None] + (col0 * xs)[:, None, None])[:, None])  # M,3,S,ky
        tmp = sum(windows[start[..., k]].float() * wy[:, None, :, k, None] for k in range(ky)).to(tmp_dtype)
        gi = ix[:, None, None].expand(m, 3, size, size, kx)
        return sum(tmp.gather(3, gi[..., k]).float() * wx[:, None, None, :, k] for k in range(kx))
    # Eager: pass 1 gathers each tap's source rows (one index_select of whole windows) and accumulates in place;
    # pass 2 is a batched matmul with the column taps spread into a dense (wc, S) matrix.
    first = off[:, None] + torch.arange(3, device=dev) * cs[:, None] + col0[:, None] * xs[:, None]     # (M, 3)
    rows = (y1[:, None, None] + iy) * rs[:, None, None]                                              # (M, S, ky)
    tmp = torch.zeros(m, 3, size, wc, device=dev)
    for k in range(ky):
        sel = windows.index_select(0, (first[:, :, None] + rows[:, None, :, k]).reshape(-1))
        tmp.addcmul_(sel.view(m, 3, size, wc), wy[:, None, :, k, None])
    wx_d = torch.zeros(m, size, wc, device=dev).scatter_add_(2, ix, wx)
    return torch.matmul(tmp, wx_d[:, None].transpose(-1, -2))


def resized_crops(canvas: Tensor, boxes: Tensor, batch_index: Tensor, size: int) -> Tensor:
    """Crop integer `boxes` (x1, y1, x2, y2) out of `canvas[batch_index]` and resize each to size x size, as
    torchvision's `resized_crop(..., antialias=True)` on float images (a convenience for tests and tools)."""
    flat, meta = source_meta(canvas)
    boxes = boxes.float()
    ky, kx, wc = tap_counts(boxes.cpu(), size)
    xstep = int(meta[0, 5])
    meta = meta[batch_index.cpu()].to(canvas.device)
    return crop_resize(flat, meta, boxes.to(canvas.device), None, size, ky, kx, wc, xstep)
