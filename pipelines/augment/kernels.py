"""Triton kernels for a view group's photometric chain: colour jitter (per-sample random order), grayscale,
gaussian blur, solarize, normalize, written once in the output dtype and memory format.

`photometric(x, p, g, ...)` takes the group's cropped views (M, 3, S, S), floats in [0, 1], and its rows of the
engine's parameter table (float64, read in the kernels: no per-batch tensor ops) and launches at most four
kernels, each reading its input once and writing its output once:

1. `_contrast_mean_kernel` (when contrast is jittered), one program per image: the mean luma of the image as it
   is when contrast's turn comes (the jitter ops that precede contrast in the sample's order are applied on the
   fly), exactly as `augment.engine.color_jitter` takes it: (M,) float32.
2. `_colour_kernel`: per pixel, all three channels in registers: the jitter ops in the sample's order (contrast
   blending towards the mean of 1.), grayscale; without blur also solarize + normalize into the output.
3. `_blur_kernel` twice (rows, then columns, reflect padding, taps computed from the sample's sigma as
   `augment.engine.gaussian_blur`); the second pass also solarizes, normalizes and writes the output.

Intermediates (the colour result and the row-blurred image) are stored in `tmp_dtype`. The kernels follow
`augment.engine`'s eager ops formula by formula (the eager path is the reference). Without triton this module still
imports (`AVAILABLE` is False). For counting without a GPU, `record_launches()` records every launch (kernel,
grid, bytes of the tensors it writes); on the `meta` device nothing is launched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    AVAILABLE = True
except ImportError:      # the engine falls back to its compiled/eager paths
    AVAILABLE = False

__all__ = ["AVAILABLE", "photometric", "record_launches"]

BLOCK, NUM_WARPS = 1024, 8         # pixels per program, 4 per thread: <= 64 registers each, no spills on sm_90
_recorder: list | None = None


_execute = True


@contextmanager
def record_launches(execute: bool = True):
    """Collect one dict per kernel launch (name, grid, bytes written) made inside the block; `execute=False`
    records without launching (the outputs stay uninitialized), e.g. to count a CPU run without a GPU."""
    global _recorder, _execute
    prev, _recorder, prev_exec, _execute = _recorder, [], _execute, execute
    try:
        yield _recorder
    finally:
        _recorder, _execute = prev, prev_exec


def _launch(kernel, grid, outputs, *args, **meta):
    if _recorder is not None:
        _recorder.append({"kernel": getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel)), "grid": grid,
                          "bytes_written": sum(t.numel() * t.element_size() for t in outputs)})
    if _execute and outputs[0].device.type != "meta":
        kernel[grid](*args, **meta)


if AVAILABLE:
    @triton.jit
    def _luma(r, g, b):
        return r * 0.2989 + g * 0.587 + b * 0.114

    @triton.jit
    def _clamp01(v):
        return tl.minimum(tl.maximum(v, 0.0), 1.0)

    @triton.jit
    def _mod(a, m):
        return a - m * tl.floor(a / m)

    @triton.jit
    def _hue(r, g, b, f):
        """`augment.engine.adjust_hue`: RGB -> HSV, rotate hue by f turns, -> RGB."""
        maxc = tl.maximum(tl.maximum(r, g), b)
        minc = tl.minimum(tl.minimum(r, g), b)
        delta = maxc - minc
        eq = delta == 0
        s = delta / tl.where(eq, 1.0, maxc)
        d = tl.where(eq, 1.0, delta)
        rc = (maxc - r) / d
        gc = (maxc - g) / d
        bc = (maxc - b) / d
        h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
        h = tl.where(eq, 0.0, h)
        h = _mod(_mod(h / 6.0, 1.0) + f, 1.0)
        vs = maxc * s
        k = _mod(5.0 + 6.0 * h, 6.0)
        r2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
        k = _mod(3.0 + 6.0 * h, 6.0)
        g2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
        k = _mod(1.0 + 6.0 * h, 6.0)
        b2 = maxc - vs * _clamp01(tl.minimum(k, 4.0 - k))
        return r2, g2, b2

    @triton.jit
    def _jitter_op(r, g, b, op, f, cmean, HUE: tl.constexpr):
        """One colour-jitter op: 0 brightness, 1 contrast (towards cmean), 2 saturation, 3 hue."""
        if op == 0:
            r, g, b = _clamp01(r * f), _clamp01(g * f), _clamp01(b * f)
        elif op == 1:
            ref = cmean * (1 - f)
            r, g, b = _clamp01(r * f + ref), _clamp01(g * f + ref), _clamp01(b * f + ref)
        elif op == 2:
            ref = _luma(r, g, b) * (1 - f)
            r, g, b = _clamp01(r * f + ref), _clamp01(g * f + ref), _clamp01(b * f + ref)
        else:
            if HUE:
                r, g, b = _hue(r, g, b, f)
        return r, g, b

    @triton.jit
    def _finish(r, g, b, row, COL_SOL: tl.constexpr, SOLARIZE: tl.constexpr, m0, m1, m2, s0, s1, s2):
        if SOLARIZE:
            if tl.load(row + COL_SOL) > 0:
                r = tl.where(r >= 0.5, 1.0 - r, r)
                g = tl.where(g >= 0.5, 1.0 - g, g)
                b = tl.where(b >= 0.5, 1.0 - b, b)
        return (r - m0) / s0, (g - m1) / s1, (b - m2) / s2

    @triton.jit
    def _store_rgb(o_ptr, n, yy, xx, son, soc, soh, sow, r, g, b, mask):
        """Write one block of pixels of image n, three channels, in the output's dtype and strides."""
        out = o_ptr + n.to(tl.int64) * son + yy * soh + xx * sow
        tl.store(out, r.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(out + soc, g.to(o_ptr.dtype.element_ty), mask=mask)
        tl.store(out + 2 * soc, b.to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _contrast_mean_kernel(x_ptr, p_ptr, mean_ptr, sxn, sxc, sxh, sxw, P_STRIDE, S: tl.constexpr,
                              COL_JIT: tl.constexpr, COL_FACT: tl.constexpr, COL_ORDER: tl.constexpr,
                              HUE: tl.constexpr, BLOCK: tl.constexpr):
        """One program per image. S is a constexpr because it bounds the loop: a runtime bound reaches Python's
        range() in Triton's interpreter as a 1-element array, which triton 3.6's tensor.__index__ (int(array))
        cannot convert under numpy >= 2.5. One compiled variant per view size (2 in a recipe); the compiler also
        turns // S and % S into multiplies."""
        n = tl.program_id(0)
        row = p_ptr + n.to(tl.int64) * P_STRIDE
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        if tl.load(row + COL_JIT) > 0:
            cpos = 0
            for j in tl.static_range(4):
                cpos += j * (tl.load(row + COL_ORDER + j) == 1).to(tl.int32)
            base = x_ptr + n.to(tl.int64) * sxn
            for start in range(0, S * S, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < S * S
                ptr = base + (offs // S) * sxh + (offs % S) * sxw
                r = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                g = tl.load(ptr + sxc, mask=mask, other=0.0).to(tl.float32)
                b = tl.load(ptr + 2 * sxc, mask=mask, other=0.0).to(tl.float32)
                for j in tl.static_range(4):
                    if j < cpos:                    # the ops before contrast, in the sample's order
                        op = tl.load(row + COL_ORDER + j).to(tl.int32)
                        f = tl.load(row + COL_FACT + op).to(tl.float32)
                        r, g, b = _jitter_op(r, g, b, op, f, 0.0, HUE)
                acc += tl.where(mask, _luma(r, g, b), 0.0)
        tl.store(mean_ptr + n, tl.sum(acc, axis=0) / (S * S))

    @triton.jit
    def _colour_kernel(x_ptr, p_ptr, mean_ptr, o_ptr, S, sxn, sxc, sxh, sxw, son, soc, soh, sow, P_STRIDE,
                       m0, m1, m2, s0, s1, s2,
                       COL_JIT: tl.constexpr, COL_FACT: tl.constexpr, COL_ORDER: tl.constexpr,
                       COL_GRAY: tl.constexpr, COL_SOL: tl.constexpr, JITTER: tl.constexpr, CONTRAST: tl.constexpr,
                       HUE: tl.constexpr, GRAY: tl.constexpr, FINAL: tl.constexpr, SOLARIZE: tl.constexpr,
                       BLOCK: tl.constexpr):
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S * S
        yy, xx = offs // S, offs % S
        row = p_ptr + n.to(tl.int64) * P_STRIDE
        ptr = x_ptr + n.to(tl.int64) * sxn + yy * sxh + xx * sxw
        r = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(ptr + sxc, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ptr + 2 * sxc, mask=mask, other=0.0).to(tl.float32)
        if JITTER:
            if tl.load(row + COL_JIT) > 0:
                cmean = 0.0
                if CONTRAST:
                    cmean = tl.load(mean_ptr + n)
                for j in tl.static_range(4):
                    op = tl.load(row + COL_ORDER + j).to(tl.int32)
                    f = tl.load(row + COL_FACT + op).to(tl.float32)
                    r, g, b = _jitter_op(r, g, b, op, f, cmean, HUE)
        if GRAY:
            if tl.load(row + COL_GRAY) > 0:
                lum = _luma(r, g, b)
                r, g, b = lum, lum, lum
        if FINAL:
            r, g, b = _finish(r, g, b, row, COL_SOL, SOLARIZE, m0, m1, m2, s0, s1, s2)
        _store_rgb(o_ptr, n, yy, xx, son, soc, soh, sow, r, g, b, mask)

    @triton.jit
    def _blur_kernel(x_ptr, p_ptr, o_ptr, S, sxn, sxc, sxh, sxw, son, soc, soh, sow, P_STRIDE,
                     m0, m1, m2, s0, s1, s2,
                     COL_BLUR: tl.constexpr, COL_SIGMA: tl.constexpr, COL_SOL: tl.constexpr, AXIS: tl.constexpr,
                     MAX_HALF: tl.constexpr, FINAL: tl.constexpr, SOLARIZE: tl.constexpr, BLOCK: tl.constexpr):
        """One separable pass (AXIS 1: along rows, 0: along columns), reflect padding."""
        n = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < S * S
        yy, xx = offs // S, offs % S
        row = p_ptr + n.to(tl.int64) * P_STRIDE
        base = x_ptr + n.to(tl.int64) * sxn
        if tl.load(row + COL_BLUR) > 0:
            s = tl.maximum(tl.load(row + COL_SIGMA).to(tl.float32), 1e-6)
            radius = tl.minimum(tl.ceil(3 * s), MAX_HALF)
            total = 0.0
            for i in tl.static_range(2 * MAX_HALF + 1):
                t = i - MAX_HALF
                total += tl.where(t * t <= radius * radius, tl.exp(-0.5 * (t / s) * (t / s)), 0.0)
            r = tl.zeros((BLOCK,), dtype=tl.float32)
            g = tl.zeros((BLOCK,), dtype=tl.float32)
            b = tl.zeros((BLOCK,), dtype=tl.float32)
            for i in range(2 * MAX_HALF + 1):       # a loop, not unrolled: a few registers per tap, no spills
                t = i - MAX_HALF
                w = tl.where(t * t <= radius * radius, tl.exp(-0.5 * (t / s) * (t / s)), 0.0) / total
                if AXIS == 1:
                    q = xx + t
                    q = tl.where(q < 0, -q, q)
                    q = tl.where(q >= S, 2 * S - 2 - q, q)
                    ptr = base + yy * sxh + q * sxw
                else:
                    q = yy + t
                    q = tl.where(q < 0, -q, q)
                    q = tl.where(q >= S, 2 * S - 2 - q, q)
                    ptr = base + q * sxh + xx * sxw
                r += w * tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
                g += w * tl.load(ptr + sxc, mask=mask, other=0.0).to(tl.float32)
                b += w * tl.load(ptr + 2 * sxc, mask=mask, other=0.0).to(tl.float32)
        else:
            ptr = base + yy * sxh + xx * sxw
            r = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(ptr + sxc, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(ptr + 2 * sxc, mask=mask, other=0.0).to(tl.float32)
        if FINAL:
            r, g, b = _finish(r, g, b, row, COL_SOL, SOLARIZE, m0, m1, m2, s0, s1, s2)
        _store_rgb(o_ptr, n, yy, xx, son, soc, soh, sow, r, g, b, mask)
else:
    _contrast_mean_kernel = _colour_kernel = _blur_kernel = None


def photometric(x: Tensor, p: Tensor, g, cols: dict, mean, std, out_dtype: torch.dtype, channels_last: bool,
                tmp_dtype: torch.dtype) -> Tensor:
    """The photometric chain of view group `g` on its crops `x` (M, 3, S, S) in [0, 1] (any float dtype and
    strides): (M, 3, S, S) normalized `out_dtype`, channels-last if asked. `p`: the group's (M, K) float64 rows of
    the parameter table on x's device; `cols`: its column indices (jit, fact, order, gray, blur, sigma, sol);
    `mean`, `std`: 3 floats each."""
    if not AVAILABLE:
        raise RuntimeError("pipelines.augment.kernels needs triton: install it or use the compiled/eager engine")
    m, c, size, _ = x.shape
    if c != 3 or p.dtype != torch.float64 or p.stride(1) != 1:
        raise ValueError(f"photometric: expected (M, 3, S, S) views and a float64 row-major table, got "
                         f"{tuple(x.shape)} and {p.dtype} strides {p.stride()}")
    jitter = g.jitter_p > 0 and any(v > 0 for v in g.jitter)
    contrast, hue = jitter and g.jitter[1] > 0, g.jitter[3] > 0
    blur, solarize = g.blur_p > 0, g.solarize_p > 0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty((m, 3, size, size), dtype=out_dtype, device=x.device, memory_format=fmt)
    norm = (*map(float, mean), *map(float, std))
    grid = (m, -(-size * size // BLOCK))
    kw = dict(BLOCK=BLOCK, num_warps=NUM_WARPS)

    cmean = torch.empty(m if contrast else 1, dtype=torch.float32, device=x.device)
    if contrast:
        _launch(_contrast_mean_kernel, (m,), [cmean], x, p, cmean, *x.stride(), p.stride(0), S=size,
                COL_JIT=cols["jit"], COL_FACT=cols["fact"], COL_ORDER=cols["order"], HUE=hue, **kw)
    y = torch.empty((m, 3, size, size), dtype=tmp_dtype, device=x.device) if blur else out
    _launch(_colour_kernel, grid, [y], x, p, cmean, y, size, *x.stride(), *y.stride(), p.stride(0), *norm,
            COL_JIT=cols["jit"], COL_FACT=cols["fact"], COL_ORDER=cols["order"], COL_GRAY=cols["gray"],
            COL_SOL=cols["sol"], JITTER=jitter, CONTRAST=contrast, HUE=hue, GRAY=g.gray_p > 0, FINAL=not blur,
            SOLARIZE=solarize, **kw)
    if not blur:
        return out
    max_half = min(math.ceil(3 * g.blur_sigma[1]), (size - 1) // 2)
    h = torch.empty_like(y)
    for src, dst, axis in ((y, h, 1), (h, out, 0)):
        _launch(_blur_kernel, grid, [dst], src, p, dst, size, *src.stride(), *dst.stride(), p.stride(0), *norm,
                COL_BLUR=cols["blur"], COL_SIGMA=cols["sigma"], COL_SOL=cols["sol"], AXIS=axis, MAX_HALF=max_half,
                FINAL=dst is out, SOLARIZE=solarize, **kw)
    return out
