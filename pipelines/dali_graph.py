"""Compile a `MultiCropSpec` into DALI operators: the augmentation graph of the `dali` backend.

Called inside a DALI pipeline definition (`@pipeline_def(enable_conditionals=True)`). The same graph runs on
the GPU (`gpu=True`: nvJPEG/hardware decode on device='mixed', every later image op on the GPU) and on the CPU
(`gpu=False`, what the tests and CI run); only the decoder's device differs, DALI places the rest after its
input. Random parameters are per sample and per view: every view is its own chain of operator instances, and
DALI seeds each instance differently from the pipeline seed, so no crop window or colour draw is shared between
views (never pass one explicit `seed=` to several of them).

Per view, in the order of the official recipe (`augment/engine.py` has the torch reference):

    random resized crop -> colour jitter (p) -> grayscale (p) -> gaussian blur (p) -> solarize (p)
    -> flip + normalize + cast (crop_mirror_normalize, HWC)

Semantics compared with torchvision / the torch engine:
- crop: `fn.random_resized_crop` draws area and log-aspect like `RandomResizedCrop.get_params` (10 tries),
  integer windows; resizing is linear with antialiasing (torch engine: torchvision's triangle filter).
- flip is applied last, inside crop_mirror_normalize: every photometric op here is per pixel or a symmetric
  blur, so flipping commutes with them.
- colour jitter: brightness and contrast are computed as torchvision does (contrast blends with the view's
  mean luma), saturation as a blend with luma (DALI's YIQ saturation). Hue is NOT torchvision's: DALI rotates
  hue linearly in YIQ (luma kept) where torchvision rotates it in HSV (max and min kept, luma changes). They
  share only the direction: on four natural photos, at a hue factor of 0.1 turn, the mean |DALI - torchvision|
  was 17/255 while torchvision's own change was 13/255 (0.05 turn: 11/255 vs 7/255). It is a hue perturbation
  of the same size, not an approximation; exact HSV in DALI arithmetic would cost ~50 full-image passes per view.
  With a luma-preserving hue all four jitter ops are affine maps that commute, so torchvision's random op order
  would only move where intermediate values clip to [0, 255]: the ops run in one order, clipped after the
  linear part and after the colour twist.
- grayscale is saturation 0 folded into the same colour twist (exact: it follows the jitter and commutes with
  hue/saturation). Luma weights 0.299/0.587/0.114 (torchvision: 0.2989/0.587/0.114).
- blur: separable gaussian, kernel radius ceil(3 sigma) as torchvision, per-sample sigma; runs only on the
  samples whose coin came up (a DALI conditional), not blended everywhere.
- solarize: a 256-entry lookup table (pixels >= 128 inverted, as PIL), only on the samples whose coin came up.
- images stay uint8 between ops, as in the official PIL pipeline (each op rounds to nearest, <= 0.5/255); the
  linear part of the jitter is computed in float and rounded once. uint8 intermediates keep the pipeline's
  memory and bandwidth a quarter of float ones.
"""
from __future__ import annotations

import numpy as np
import torch
import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types

from pipelines.spec import MultiCropSpec, ViewGroup

LUMA = (0.299, 0.587, 0.114)


def dali_out_dtype(dtype: torch.dtype):
    """DALI output type for a torch training dtype. DALI has no bfloat16: it delivers float16 (enough precision
    for normalized pixels) and the backend casts on the device."""
    if dtype == torch.float32:
        return types.FLOAT
    if dtype in (torch.float16, torch.bfloat16):
        return types.FLOAT16
    raise ValueError(f"dali backend: unsupported view dtype {dtype}; use float32, float16 or bfloat16")


def mixed_decoder_args(hw_decoder_load: float, preallocate: tuple[int, int],
                       memory_padding: tuple[int, int]) -> dict:
    """Settings of the GPU ('mixed') JPEG decoder, from the `data.dali.*` keys (their defaults and reasons live in
    engine/config_schema.py, DaliConfig): the share of images sent to the hardware JPEG engines rather than
    Huffman-decoded on the pipeline's CPU threads, width/height hints to preallocate the hardware decoder's memory
    (0: none), and nvJPEG's per-thread device/host buffer padding in bytes."""
    w, h = preallocate
    return {"hw_decoder_load": float(hw_decoder_load), "preallocate_width_hint": int(w),
            "preallocate_height_hint": int(h), "device_memory_padding": int(memory_padding[0]),
            "host_memory_padding": int(memory_padding[1])}


def decode(encoded, gpu: bool, mixed_args: dict | None = None):
    """Whole-image RGB decode: nvJPEG (hardware decoder where present) on 'mixed', libjpeg-turbo etc. on CPU."""
    kw = (mixed_args or {}) if gpu else {}
    return fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB, **kw)


def _uniform(lo: float, hi: float):
    """Per-sample uniform draw; a constant when the range is a single value (DALI rejects empty ranges)."""
    return fn.random.uniform(range=(float(lo), float(hi))) if hi > lo else float(lo)


def _coin(p: float):
    return fn.random.coin_flip(probability=float(p), dtype=types.BOOL)


def _jitter_and_gray(x, g: ViewGroup):
    """Colour jitter with probability g.jitter_p, then grayscale with g.gray_p (see the module notes)."""
    b, c, s, h = g.jitter
    jit = g.jitter_p > 0 and any(v > 0 for v in g.jitter)
    if not jit and g.gray_p <= 0:
        return x
    on = _coin(g.jitter_p) if jit else None

    def factor(lo, hi):               # the jittered factor where `on`, else 1 (identity)
        return 1.0 + on * (_uniform(lo, hi) - 1.0)

    linear = jit and (b > 0 or c > 0)
    if linear:                        # brightness * contrast around the mean luma, in float, clipped
        bf = factor(max(0.0, 1 - b), 1 + b) if b > 0 else 1.0
        cf = factor(max(0.0, 1 - c), 1 + c) if c > 0 else 1.0
        mean_rgb = fn.reductions.mean(x, axes=[0, 1])
        luma = fn.reductions.sum(mean_rgb * types.Constant(np.float32(LUMA)))
        x = dmath.clamp(x * (bf * cf) + (bf * (1.0 - cf)) * luma, 0.0, 255.0)
    sat = factor(max(0.0, 1 - s), 1 + s) if jit and s > 0 else None
    if g.gray_p > 0:
        keep = 1.0 - _coin(g.gray_p)
        sat = keep if sat is None else sat * keep
    hue = on * _uniform(-360.0 * h, 360.0 * h) if jit and h > 0 else None
    if sat is None and hue is None:
        return fn.cast(x, dtype=types.UINT8) if linear else x      # rounds to nearest, saturates
    kw = {"saturation": sat} if sat is not None else {}
    if hue is not None:
        kw["hue"] = hue
    return fn.color_twist(x, dtype=types.UINT8, **kw)             # the uint8 output clips to [0, 255]


def _blur(x, g: ViewGroup):
    if g.blur_p <= 0:
        return x
    if g.blur_p >= 1:
        return fn.gaussian_blur(x, sigma=_uniform(*g.blur_sigma))
    if _coin(g.blur_p):               # a DALI conditional: only these samples are blurred
        x = fn.gaussian_blur(x, sigma=_uniform(*g.blur_sigma))
    return x


_SOLARIZE = [v if v < 128 else 255 - v for v in range(256)]   # PIL: invert pixels >= 128


def _solarize(x, g: ViewGroup):
    if g.solarize_p <= 0:
        return x
    if _coin(g.solarize_p):           # a DALI conditional: only these samples go through the table
        x = fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8)
    return x


def _normalize(x, spec: MultiCropSpec, dtype, flip_p: float):
    mirror = fn.random.coin_flip(probability=float(flip_p)) if flip_p > 0 else 0
    return fn.crop_mirror_normalize(x, mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std],
                                    dtype=dtype, output_layout="HWC", mirror=mirror)


def view(image, g: ViewGroup, spec: MultiCropSpec, dtype, encoded=None, gpu: bool = False,
         mixed_args: dict | None = None):
    """One view of group `g`: from the decoded `image`, or, with `encoded` set, by the fused
    decode-and-crop decoder (only the crop window is decoded) followed by a resize."""
    if encoded is not None:
        x = fn.decoders.image_random_crop(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                          random_area=list(g.scale), random_aspect_ratio=list(g.ratio),
                                          num_attempts=10, **((mixed_args or {}) if gpu else {}))
        x = fn.resize(x, size=[g.size, g.size], antialias=True)
    else:
        x = fn.random_resized_crop(image, size=[g.size, g.size], random_area=list(g.scale),
                                   random_aspect_ratio=list(g.ratio), num_attempts=10, antialias=True)
    x = _jitter_and_gray(x, g)
    x = _blur(x, g)
    x = _solarize(x, g)
    return _normalize(x, spec, dtype, g.flip_p)


def multicrop(encoded, spec: MultiCropSpec, dtype, gpu: bool, fused: bool = False,
              mixed_args: dict | None = None) -> list:
    """All views of `spec`, in spec order (globals first), each HWC in `dtype`, normalized.
    fused=False decodes each image once and crops it per view (best for many views: one decode, one buffer);
    fused=True decodes only each view's window, once per view (saves the full-image buffer; for 1-2 views).
    `mixed_args` (`mixed_decoder_args`) tune the GPU decoder."""
    image = None if fused else decode(encoded, gpu, mixed_args)
    return [view(image, g, spec, dtype, encoded if fused else None, gpu, mixed_args)
            for g in spec.groups for _ in range(g.count)]


def eval_view(encoded, resize: int, crop: int, mean, std, dtype, gpu: bool, mixed_args: dict | None = None):
    """Deterministic evaluation view: shorter side to `resize` (antialiased), centre `crop`, normalize."""
    x = fn.resize(decode(encoded, gpu, mixed_args), resize_shorter=float(resize), antialias=True)
    return fn.crop_mirror_normalize(x, crop=[crop, crop], crop_pos_x=0.5, crop_pos_y=0.5,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], dtype=dtype,
                                    output_layout="HWC")
