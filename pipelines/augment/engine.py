"""Batched multi-crop augmentation on tensors (CPU or CUDA), compiled from a `MultiCropSpec`.

Every view of every sample gets its own random crop and photometric parameters, but the work is done
per view group on the whole batch at once, with no Python loop over samples. Per view, in the official
TWIST/BYOL order:

    random resized crop (antialiased, read straight from the uint8 images: `crop_resize`) -> flip
    -> colour jitter (p) -> grayscale (p) -> gaussian blur (p) -> solarize (p) -> normalize

All random numbers are drawn on the generator's device (the CPU by default) into one per-batch table that
reaches the images' device in a single copy (pinned, non-blocking on CUDA), so a seeded generator gives the
same views on CPU and GPU and a call never waits for the GPU. Each view group is one function of static
shapes (`group_views`), run eagerly on the CPU (the reference). On CUDA with triton importable, the group's crop
(`stored_crop`) is compiled with torch.compile and its photometric chain runs as four Triton kernels
(`pipelines.augment.kernels`); without triton, the whole `group_views` is compiled.
Photometric ops work on float images in [0, 1] and follow `torchvision.transforms.v2.functional`,
with per-sample factors instead of scalars.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from pipelines.augment.crop_resize import crop_resize, source_meta, tap_counts
from pipelines.spec import MultiCropSpec, ViewGroup

__all__ = ["MultiCropAugment", "group_views", "group_photometric", "sample_crop_boxes",
           "rgb_to_grayscale", "adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue", "color_jitter",
           "gaussian_blur", "solarize"]

_LUMA = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale weights (ITU-R 601-2, R rounded as in tv)
_MAX_TRIES = 10                  # torchvision RandomResizedCrop attempts before the centre-crop fallback


# ----------------------------------------------------------------------------------------- geometry
def sample_crop_boxes(sizes: Tensor, scale, ratio, generator: torch.Generator | None = None) -> Tensor:
    """Vectorised `torchvision.transforms.RandomResizedCrop.get_params` for N images.

    sizes: (N, 2) (h, w). Draws `_MAX_TRIES` candidates per image, keeps the first valid one, and
    falls back to torchvision's centre crop (aspect clamped to `ratio`) when none is valid.
    Returns (N, 4) float32 boxes (x1, y1, x2, y2) in pixels on the generator's device (CPU by default);
    pixel columns x1 .. x2-1 are inside the crop.
    """
    dev = generator.device if generator is not None else torch.device("cpu")
    hw = sizes.to(dev, torch.float64)
    H, W = hw[:, :1], hw[:, 1:]
    n = hw.shape[0]
    u = torch.rand((n, 2 * _MAX_TRIES + 2), generator=generator, device=dev, dtype=torch.float64)
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, :_MAX_TRIES])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, _MAX_TRIES:2 * _MAX_TRIES])
    w = torch.round(torch.sqrt(area * aspect))       # round-half-even, like Python's round()
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first valid try (0 if none)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    H, W = H[:, 0], W[:, 0]

    # Centre-crop fallback, exactly as torchvision.
    in_ratio = W / H
    rmin, rmax = min(ratio), max(ratio)
    fw = torch.where(in_ratio > rmax, torch.round(H * rmax), W)
    fh = torch.where(in_ratio < rmin, torch.round(W / rmin), H)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    y = torch.where(found, torch.floor(u[:, -2] * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor"))
    x = torch.where(found, torch.floor(u[:, -1] * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor"))
    return torch.stack([x, y, x + w, y + h], 1).float()


# ------------------------------------------------------------------------------ photometric (per sample)
def _per_sample(f: Tensor) -> Tensor:
    return f.reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    return x[:, 0:1] * _LUMA[0] + x[:, 1:2] * _LUMA[1] + x[:, 2:3] * _LUMA[2]


def _blend(x: Tensor, ref: Tensor | float, f: Tensor) -> Tensor:
    f = _per_sample(f)
    return (x * f + ref * (1 - f)).clamp_(0, 1)


def adjust_brightness(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, 0.0, f)


def adjust_contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, rgb_to_grayscale(x).mean((-3, -2, -1), keepdim=True), f)


def adjust_saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, rgb_to_grayscale(x), f)


def _rgb_to_hsv(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    eq = delta == 0
    s = delta / torch.where(eq, torch.ones_like(maxc), maxc)
    d = torch.where(eq, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(eq, torch.zeros_like(h), h)
    return (h / 6.0).remainder(1.0), s, maxc


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    # c_n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b.
    n = (5.0 - 2.0 * torch.arange(3, device=h.device, dtype=h.dtype)).view(1, 3, 1, 1)
    k = (n + 6.0 * h[:, None]).remainder(6.0)
    return v[:, None] - (v * s)[:, None] * torch.minimum(k, 4.0 - k).clamp(0, 1)


def adjust_hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate hue by f (in turns, |f| <= 0.5) per sample."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + f.view(-1, 1, 1)).remainder(1.0), s, v)


def _linear_op(x: Tensor, op: Tensor, factors: Tensor, active: Tensor) -> Tensor:
    """Per sample, apply brightness (op 0), contrast (1) or saturation (2) where `active`: all three
    are `clamp(f*x + (1-f)*ref)` with ref = 0, mean gray, gray, so this is a single blend."""
    f = torch.where(active, factors.gather(1, op[:, None])[:, 0], torch.ones_like(factors[:, 0]))
    gray = rgb_to_grayscale(x)
    mean = gray.mean((-2, -1), keepdim=True)
    ref = torch.where(_per_sample(op == 2), gray, torch.where(_per_sample(op == 1), mean, 0.0))
    return _blend(x, ref, f)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor, hue: bool = True,
                 fused: bool = False) -> Tensor:
    """Per-sample ColorJitter.

    factors: (N, 4) brightness, contrast, saturation, hue; order: (N, 4) per-sample permutation of
    0..3 (op index applied at each position, as torchvision's `fn_idx`); apply: (N,) bool, samples
    left unchanged where False; hue=False skips the hue op (torchvision's hue=None).
    The (expensive) hue rotation runs once: each sample's linear ops before its hue position run
    first, then hue, then its remaining linear ops (3 + 3 masked blends). `fused` (for torch.compile):
    `_color_jitter_fused`, the same function with a single reduction.
    """
    if fused:
        return _color_jitter_fused(x, factors, order, apply, hue)
    is_hue = (order == 3).to(torch.uint8)
    k = is_hue.argmax(1)                                                    # hue position
    lin = order.gather(1, torch.argsort(is_hue, dim=1, stable=True))[:, :3]  # linear ops, in order
    for j in range(3):
        x = _linear_op(x, lin[:, j], factors, apply & (j < k) if hue else apply)
    if hue:
        x = torch.where(_per_sample(apply), adjust_hue(x, factors[:, 3]), x)
        for j in range(3):
            x = _linear_op(x, lin[:, j], factors, apply & (j >= k))
    return x


def _color_jitter_fused(x: Tensor, factors: Tensor, order: Tensor, apply: Tensor, hue: bool) -> Tensor:
    """`color_jitter` with one reduction: contrast is each sample's only op that is not per pixel, so the ops
    before it (per sample) run, the mean grey of their result is taken, and contrast and the ops after it follow.
    Every position computes brightness, saturation and hue for every sample and keeps its own op's result:
    pure arithmetic, which a compiled kernel does in registers (eagerly, `color_jitter` is cheaper)."""
    cpos = _per_sample((order == 1).to(torch.uint8).argmax(1))

    def ops(x: Tensor, first: bool) -> Tensor:
        for j in range(4):
            op = _per_sample(order[:, j])
            f = _per_sample(factors.gather(1, order[:, j:j + 1])[:, 0])
            y = (x * f + torch.where(op == 2, rgb_to_grayscale(x), 0.0) * (1 - f)).clamp(0, 1)
            if hue:
                y = torch.where(op == 3, adjust_hue(x, factors[:, 3]), y)
            active = _per_sample(apply) & (op != 1) & ((j < cpos) if first else (j > cpos))
            x = torch.where(active if hue else active & (op != 3), y, x)
        return x

    x = ops(x, True)
    con = _blend(x, rgb_to_grayscale(x).mean((-2, -1), keepdim=True), factors[:, 1])
    return ops(torch.where(_per_sample(apply), con, x), False)


def gaussian_blur(x: Tensor, sigma: Tensor, max_half: int, fused: bool = False, store=torch.float32) -> Tensor:
    """Separable gaussian blur with a per-sample sigma (<= 0: identity), reflect padding.

    Each sample's kernel has torchvision's size 2*ceil(3 sigma)+1 (at most 2*max_half+1), zero-padded to
    2*max_half+1 taps. `fused` (for torch.compile) writes each pass as a sum of shifted slices of the
    reflect-padded images (one fused kernel per pass, the first pass's result kept in `store`); eagerly, each
    pass is one depthwise convolution.
    """
    n, c, hgt, wid = x.shape
    t = torch.arange(-max_half, max_half + 1, device=x.device, dtype=torch.float32)
    s = sigma.float().clamp_min(1e-6)[:, None]
    radius = torch.ceil(3 * s).clamp(max=max_half)
    k = torch.exp(-0.5 * (t / s) ** 2) * (t.abs() <= radius)
    k = (k / k.sum(1, keepdim=True)).to(x.dtype)
    if fused:
        y = F.pad(x, (max_half, max_half, 0, 0), mode="reflect")
        x = sum(k[:, i, None, None, None] * y[..., i:i + wid] for i in range(2 * max_half + 1)).to(store).float()
        y = F.pad(x, (0, 0, max_half, max_half), mode="reflect")
        return sum(k[:, i, None, None, None] * y[..., i:i + hgt, :] for i in range(2 * max_half + 1))
    k = k.repeat_interleave(c, 0)                                   # (N*C, K)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (max_half,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, hgt, wid)


def solarize(x: Tensor, mask: Tensor) -> Tensor:
    """Invert pixels >= 0.5 where mask. On [0, 1] floats, 0.5 is PIL's threshold 128 after rounding."""
    return torch.where(_per_sample(mask) & (x >= 0.5), 1.0 - x, x)


# ------------------------------------------------------------------------------------------ engine
# Columns of the per-sample parameter table: random parameters (`MultiCropAugment._sample`), then where the
# sample's image lives (`crop_resize.source_meta`). float64, so flat offsets stay exact.
_BOX, _FLIP, _JIT, _FACT, _ORDER, _GRAY, _BLUR, _SIGMA, _SOL, _META = (
    slice(0, 4), 4, 5, slice(6, 10), slice(10, 14), 14, 15, 16, 17, slice(18, 25))


_COLS = {"jit": _JIT, "fact": _FACT.start, "order": _ORDER.start, "gray": _GRAY, "blur": _BLUR, "sigma": _SIGMA,
         "sol": _SOL}   # the columns the Triton kernels read (pipelines.augment.kernels)


def group_crop(flat: Tensor, p: Tensor, g: ViewGroup, taps: tuple[int, int, int], xstep: int,
               tmp_dtype: torch.dtype, fused: bool) -> Tensor:
    """The group's (count*N, 3, S, S) flipped crops as float32 in [0, 1]."""
    return crop_resize(flat, p[:, _META].long(), p[:, _BOX].float(), p[:, _FLIP] > 0 if g.flip_p > 0 else None,
                       g.size, *taps, xstep, tmp_dtype, fused) * (1 / 255)


def stored_crop(flat: Tensor, p: Tensor, g: ViewGroup, taps: tuple[int, int, int], xstep: int,
                tmp_dtype: torch.dtype, fused: bool) -> Tensor:
    """`group_crop` stored in tmp_dtype: the input of the Triton photometric kernels (compiled on CUDA)."""
    return group_crop(flat, p, g, taps, xstep, tmp_dtype, fused).to(tmp_dtype)


def group_views(flat: Tensor, p: Tensor, g: ViewGroup, taps: tuple[int, int, int], xstep: int, mean: Tensor,
                std: Tensor, out_dtype: torch.dtype, channels_last: bool, tmp_dtype: torch.dtype,
                fused: bool) -> Tensor:
    """All views of one group, (count*N, 3, S, S) normalized `out_dtype`, from the flat uint8 images and the
    group's rows of the parameter table. Pure tensor code of static shapes: runs eagerly or compiled
    (`fused`: written for Inductor to fuse; otherwise for eager speed; same results)."""
    x = group_crop(flat, p, g, taps, xstep, tmp_dtype, fused)
    if fused:               # what Inductor stores between kernels is stored in tmp_dtype
        x = x.to(tmp_dtype).float()
    return group_photometric(x, p, g, mean, std, out_dtype, channels_last, tmp_dtype, fused)


def group_photometric(x: Tensor, p: Tensor, g: ViewGroup, mean: Tensor, std: Tensor, out_dtype: torch.dtype,
                      channels_last: bool, tmp_dtype: torch.dtype, fused: bool) -> Tensor:
    """The photometric chain of `group_views` on the group's crops x (float32 in [0, 1]): the reference of
    `pipelines.augment.kernels.photometric`."""
    if g.jitter_p > 0 and any(v > 0 for v in g.jitter):
        x = color_jitter(x, p[:, _FACT].float(), p[:, _ORDER].long(), p[:, _JIT] > 0, hue=g.jitter[3] > 0,
                         fused=fused)
    if g.gray_p > 0:
        x = torch.where(_per_sample(p[:, _GRAY] > 0), rgb_to_grayscale(x).expand_as(x), x)
    if g.blur_p > 0:
        max_half = min(math.ceil(3 * g.blur_sigma[1]), (g.size - 1) // 2)
        if fused:
            x = x.to(tmp_dtype).float()
        x = gaussian_blur(x, torch.where(p[:, _BLUR] > 0, p[:, _SIGMA], 0.0), max_half, fused, tmp_dtype)
    if g.solarize_p > 0:
        x = solarize(x, p[:, _SOL] > 0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return ((x - mean) / std).to(out_dtype, memory_format=fmt)


class MultiCropAugment:
    """Compile a `MultiCropSpec` into batched tensor ops.

    `aug(images, generator)` -> spec.num_views tensors in spec order, each (N, 3, S, S), normalized
    with spec.mean/std, `out_dtype`, channels_last if requested, on the images' device.
    `compile`: run each view group through torch.compile (default: on CUDA only; the CPU runs eagerly).
    `work_dtype`: what a compiled group stores between its kernels (default float16 on CUDA, else float32).
    `use_triton`: run the photometric chain as Triton kernels (`pipelines.augment.kernels`; default: on CUDA
    when triton is importable), after the crop (compiled or eager, as `compile` says).
    `backend`: torch.compile's backend (tests count graphs with dynamo's `CompileCounter`).
    Compiled, a group makes one graph per (tap-count bucket, width bucket, batch size): the images' buffer is
    dynamic in its length, everything else static.
    """

    _BOX, _FLIP, _JIT, _FACT, _ORDER, _GRAY, _BLUR, _SIGMA, _SOL = (
        _BOX, _FLIP, _JIT, _FACT, _ORDER, _GRAY, _BLUR, _SIGMA, _SOL)

    def __init__(self, spec: MultiCropSpec, out_dtype=torch.float32, channels_last=True,
                 compile: bool | None = None, work_dtype: torch.dtype | None = None,
                 use_triton: bool | None = None, backend="inductor"):
        self.spec, self.work_dtype, self.use_triton, self.backend = spec, work_dtype, use_triton, backend
        self.out_dtype = out_dtype
        self.channels_last = channels_last
        self.compile = compile
        self._consts: dict[torch.device, tuple[Tensor, Tensor]] = {}   # (mean, std) per device, made once
        self._compiled: dict = {}

    def __getstate__(self):          # DataLoader workers get a copy: no device tensors, no compiled function
        return {**self.__dict__, "_consts": {}, "_compiled": {}}

    def _constants(self, dev: torch.device) -> tuple[Tensor, Tensor]:
        if dev not in self._consts:
            self._consts[dev] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(dev)
                                      for v in (self.spec.mean, self.spec.std))
        return self._consts[dev]

    def _runner(self, dev: torch.device):
        """(the group function, whether it is compiled)."""
        from pipelines.augment import kernels as pk
        compiled = self.compile if self.compile is not None else dev.type == "cuda"
        triton = self.use_triton if self.use_triton is not None else (dev.type == "cuda" and pk.AVAILABLE)
        fn = self._triton_views if triton else group_views
        if not compiled:
            return fn, False
        if fn not in self._compiled:
            import torch._dynamo
            # One graph per (group, tap-count bucket, width bucket): more than dynamo's default of 8.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self._compiled[fn] = (self._triton_views if triton else
                                  torch.compile(group_views, dynamic=False, fullgraph=True, backend=self.backend))
            if triton:
                self._compiled["crop"] = torch.compile(stored_crop, dynamic=False, fullgraph=True,
                                                       backend=self.backend)
        return self._compiled[fn], True

    def _triton_views(self, flat, p, g, taps, xstep, mean, std, out_dtype, channels_last, tmp_dtype, fused):
        """`group_views` with the photometric chain in Triton kernels (the crop compiled when `fused`)."""
        from pipelines.augment.kernels import photometric
        x = (self._compiled["crop"] if fused else stored_crop)(flat, p, g, taps, xstep, tmp_dtype, fused)
        return photometric(x, p, g, _COLS, self.spec.mean, self.spec.std, out_dtype, channels_last, tmp_dtype)

    def __call__(self, images, generator: torch.Generator | None = None, sizes: Tensor | None = None) -> list[Tensor]:
        """`images`: a list of CHW uint8 tensors, or an NCHW uint8 tensor (any dense memory format). With a
        tensor, `sizes` (N, 2) (h, w), on the CPU, says how much of it each image fills (top-left); without,
        every image fills it. The pixels outside an image are never read. `generator` should be a CPU one (the
        default): the parameters are drawn on its device and read on the host to size the kernels."""
        if isinstance(images, Tensor):
            if images.dim() != 4:
                raise ValueError(f"expected an NCHW tensor, got shape {tuple(images.shape)}")
            first = images
        else:
            images = list(images)
            if len(images) == 0:
                raise ValueError("MultiCropAugment: empty image list")
            first = images[0]
            if any(im.dim() != 3 or im.shape[0] != 3 or im.dtype != torch.uint8 for im in images):
                bad = next(im for im in images if im.dim() != 3 or im.shape[0] != 3 or im.dtype != torch.uint8)
                raise ValueError(f"expected uint8 images with 3 channels, got {bad.dtype} {tuple(bad.shape)}")
        if first.dtype != torch.uint8 or first.shape[-3] != 3:
            raise ValueError(f"expected uint8 images with 3 channels, got {first.dtype} {tuple(first.shape)}")
        run, compiled = self._runner(first.device)
        flat, meta = source_meta(images)
        if compiled:     # its length changes every batch: one graph for every length, not one per batch
            torch._dynamo.mark_dynamic(flat, 0)
        if sizes is not None:
            meta[:, 1:3] = sizes.cpu().to(torch.int64)
        dev, n = flat.device, meta.shape[0]
        groups = [g for g in self.spec.groups if g.count > 0]
        # Every group's parameters and image addresses in one host table, one copy to the device.
        parts = [self._sample(g, meta[:, 1:3], g.count * n, generator) for g in groups]
        table = torch.cat([torch.cat([q.double(), meta.repeat(g.count, 1).double()], 1)
                           for q, g in zip(parts, groups)])
        if dev.type == "cuda":
            table = table.pin_memory()
        dtable = table.to(dev, non_blocking=True)
        mean, std = self._constants(dev)
        tmp_dtype = self.work_dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
        views: list[Tensor] = []
        start = 0
        for q, g in zip(parts, groups):
            taps = tap_counts(q[:, self._BOX], g.size, bucket=compiled)
            x = run(flat, dtable[start:start + q.shape[0]], g, taps, int(meta[0, 5]), mean, std,
                    self.out_dtype, self.channels_last, tmp_dtype, compiled)
            start += q.shape[0]
            views.extend(x.split(n))
        return views

    def _sample(self, g: ViewGroup, sizes: Tensor, m: int, gen: torch.Generator | None) -> Tensor:
        """Draw every random parameter of m = count*N samples (view-major) into one (m, 18) table.
        The same numbers are drawn whatever the probabilities, so disabling an op leaves the others'
        draws unchanged."""
        boxes = sample_crop_boxes(sizes.repeat(m // sizes.shape[0], 1), g.scale, g.ratio, gen)
        dev = boxes.device
        u = torch.rand((m, 14), generator=gen, device=dev)
        b, c, s, h = g.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], device=dev)
        hi = torch.tensor([1 + b, 1 + c, 1 + s, h], device=dev)
        sig_lo, sig_hi = g.blur_sigma
        return torch.cat([
            boxes,
            (u[:, 0:1] < g.flip_p).float(),
            (u[:, 1:2] < g.jitter_p).float(),
            lo + (hi - lo) * u[:, 2:6],
            u[:, 6:10].argsort(1).float(),                 # uniform random permutation of the 4 jitter ops
            (u[:, 10:11] < g.gray_p).float(),
            (u[:, 11:12] < g.blur_p).float(),
            sig_lo + (sig_hi - sig_lo) * u[:, 12:13],
            (u[:, 13:14] < g.solarize_p).float(),
        ], 1)
