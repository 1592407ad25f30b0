"""Tests for the batched multi-crop augmentation engine (CPU; one CUDA parity test when available)."""
import math
from dataclasses import replace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from pipelines.augment.crop_resize import source_meta, tap_counts
from pipelines.augment.engine import (
    MultiCropAugment, adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, color_jitter,
    gaussian_blur, group_views, rgb_to_grayscale, sample_crop_boxes, solarize)
from pipelines.augment.crop_resize import resized_crops
from pipelines.spec import MultiCropSpec

OPS_OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def small_twist(**kw):
    return MultiCropSpec.twist(global_size=32, local_size=16, **kw)


def only(spec, probs=None):
    """Copy of `spec` with every random op off except `probs` ({group index: {op_p: value}})."""
    probs = probs or {}
    return replace(spec, groups=tuple(replace(g, **{**OPS_OFF, **probs.get(i, {})})
                                      for i, g in enumerate(spec.groups)))


def noise_images(n, seed=0, sizes=((48, 64), (64, 40), (50, 50))):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *sizes[i % len(sizes)]), generator=g, dtype=torch.uint8) for i in range(n)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ output contract
@pytest.mark.parametrize("out_dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_output_contract(out_dtype, channels_last):
    spec = small_twist(num_local=3)
    out = MultiCropAugment(spec, out_dtype=out_dtype, channels_last=channels_last)(noise_images(5), gen())
    assert len(out) == spec.num_views == 5
    for o, s in zip(out, spec.view_sizes()):
        assert o.shape == (5, 3, s, s) and o.dtype == out_dtype and o.device.type == "cpu"
        assert o.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.isfinite(o.float()).all()


def test_normalization_per_group():
    """With every random op off, a constant image maps to (c/255 - mean) / std in every view."""
    spec = only(replace(small_twist(num_local=2), mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4)))
    rgb = torch.tensor([200, 30, 120], dtype=torch.uint8)
    images = [rgb.view(3, 1, 1).expand(3, h, w).clone() for h, w in [(40, 60), (70, 33)]]
    expected = (rgb.float() / 255 - torch.tensor(spec.mean)) / torch.tensor(spec.std)
    for o in MultiCropAugment(spec)(images, gen()):
        torch.testing.assert_close(o, expected.view(1, 3, 1, 1).expand_as(o), atol=1e-5, rtol=0)


def test_tensor_input_equals_list_input():
    images = noise_images(4, sizes=((40, 56),))
    aug = MultiCropAugment(small_twist(num_local=2))
    for a, b in zip(aug(images, gen(3)), aug(torch.stack(images), gen(3))):
        assert torch.equal(a, b)


def test_canvas_with_sizes_needs_only_one_replicated_row_and_column():
    """A canvas holding each image top-left with only its last row/column copied once into the padding (what the
    ffcv backend's decoder writes), garbage elsewhere, gives the same views as the list of images."""
    images = noise_images(3, sizes=((20, 30), (32, 18), (32, 30)))
    canvas = torch.randint(0, 256, (3, 3, 32, 30), generator=gen(9), dtype=torch.uint8)
    for c, im in zip(canvas, images):
        h, w = im.shape[-2:]
        c[:, :h, :w] = im
        c[:, :h, w:w + 1] = im[:, :, -1:]
        c[:, h:h + 1, :w + 1] = c[:, h - 1:h, :w + 1]
    sizes = torch.tensor([im.shape[-2:] for im in images])
    aug = MultiCropAugment(small_twist(num_local=2))
    for a, b in zip(aug(images, gen(5)), aug(canvas, gen(5), sizes=sizes)):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------- crop boxes
def _tv_boxes(h, w, scale, ratio, n, seed=0):
    torch.manual_seed(seed)
    img = torch.empty(1, h, w)
    out = [RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)]
    return torch.tensor([[j, i, j + bw, i + bh] for i, j, bh, bw in out], dtype=torch.float64)


def _stats(boxes, h, w):
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return bw * bh / (h * w), torch.log(bw / bh), (boxes[:, 0] + bw / 2) / w, (boxes[:, 1] + bh / 2) / h


def _centre_fallback(h, w, ratio):
    bw, bh = (w, round(w / ratio[0])) if w / h < ratio[0] else (round(h * ratio[1]), h) if w / h > ratio[1] else (w, h)
    x, y = (w - bw) // 2, (h - bh) // 2
    return torch.tensor([x, y, x + bw, y + bh], dtype=torch.float64)


@pytest.mark.parametrize("h,w", [(240, 320), (150, 400), (30, 900), (900, 30)])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_boxes_match_torchvision(h, w, scale):
    ratio, n = (3 / 4, 4 / 3), 3000
    ours = sample_crop_boxes(torch.tensor([[h, w]]).repeat(n, 1), scale, ratio, gen(1)).double()
    ref = _tv_boxes(h, w, scale, ratio, n)
    assert torch.equal(ours, ours.round())
    assert (ours[:, :2] >= 0).all() and (ours[:, 2] <= w).all() and (ours[:, 3] <= h).all()
    assert (ours[:, 2:] > ours[:, :2]).all()
    centre = _centre_fallback(h, w, ratio)
    f_ours, f_ref = ours.eq(centre).all(1).double().mean(), ref.eq(centre).all(1).double().mean()
    if (h, w) == (150, 400) and scale == (0.4, 1.0):
        assert 0.2 < f_ref < 0.8                             # the fallback is really exercised here
    assert abs(f_ours - f_ref) < 0.04
    if f_ref == 1:                                           # elongated: nothing ever fits
        return
    for a, b in zip(_stats(ours, h, w), _stats(ref, h, w)):   # area fraction, log aspect, centre x, y
        assert ks_2samp(a.numpy(), b.numpy()).pvalue > 1e-3
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n)  # z-test on means


# ----------------------------------------------------------------------------------- photometric ops
@pytest.mark.parametrize("ours,theirs,factors", [
    (adjust_brightness, TF.adjust_brightness, [0.0, 0.3, 0.9, 1.0, 1.2, 1.6]),
    (adjust_contrast, TF.adjust_contrast, [0.0, 0.3, 0.9, 1.0, 1.2, 1.6]),
    (adjust_saturation, TF.adjust_saturation, [0.0, 0.3, 0.9, 1.0, 1.2, 1.6]),
    (adjust_hue, TF.adjust_hue, [-0.5, -0.3, -0.05, 0.0, 0.1, 0.5]),
])
def test_color_ops_match_torchvision(ours, theirs, factors):
    x = torch.rand(6, 3, 20, 24, generator=gen())
    x[0, :, :3] = 0.5                                        # grey pixels (hue undefined)
    f = torch.tensor(factors)
    expected = torch.stack([theirs(x[i], float(f[i])) for i in range(6)])
    torch.testing.assert_close(ours(x, f), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hue", [True, False])
@pytest.mark.parametrize("fused", [False, True])
def test_color_jitter_matches_sequential_torchvision(hue, fused):
    n, g = 24, gen(5)
    x = torch.rand(n, 3, 16, 16, generator=g)
    factors = torch.cat([0.6 + 0.8 * torch.rand(n, 3, generator=g), 0.2 * torch.rand(n, 1, generator=g) - 0.1], 1)
    order = torch.rand(n, 4, generator=g).argsort(1)
    apply = torch.arange(n) % 5 != 0
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for i in range(n):
        y = x[i]
        for op in order[i].tolist() if apply[i] else []:
            if op < 3 or hue:
                y = ops[op](y, float(factors[i, op]))
        expected.append(y)
    torch.testing.assert_close(color_jitter(x, factors, order, apply, hue=hue, fused=fused), torch.stack(expected),
                               atol=2e-5, rtol=0)


def test_grayscale_and_solarize():
    x = torch.rand(4, 3, 8, 8, generator=gen())
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    mask = torch.tensor([True, False, True, False])
    y = solarize(x, mask)
    torch.testing.assert_close(y[mask], TF.solarize(x[mask], 0.5))
    assert torch.equal(y[~mask], x[~mask])


def test_gaussian_blur_matches_torchvision():
    x = torch.rand(6, 3, 20, 20, generator=gen())
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.0])
    y = gaussian_blur(x, sigma, max_half=6)
    for i in range(5):
        s, k = float(sigma[i]), 2 * math.ceil(3 * float(sigma[i])) + 1
        torch.testing.assert_close(y[i], TF.gaussian_blur(x[i], [k, k], [s, s]), atol=1e-5, rtol=0)
    assert torch.equal(y[5], x[5])                           # sigma <= 0: identity


@pytest.mark.parametrize("box,size", [((0, 0, 320, 240), 64), ((0, 0, 320, 240), 224), ((17, 9, 301, 60), 96),
                                      ((40, 30, 90, 200), 24), ((0, 0, 320, 240), 400), ((100, 50, 130, 70), 96)])
def test_resized_crop_matches_torchvision_antialias(box, size):
    """Downscaling (antialiased) and upscaling, square and elongated boxes: torchvision's resized_crop."""
    img = torch.randint(0, 256, (2, 3, 240, 320), generator=gen()).float()
    x1, y1, x2, y2 = box
    ours = resized_crops(img, torch.tensor([box], dtype=torch.float32), torch.tensor([1]), size)[0]
    ref = TF.resized_crop(img[1], y1, x1, y2 - y1, x2 - x1, [size, size], antialias=True)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=0)


# ------------------------------------------------------------------------------------ randomness
def test_sampled_parameter_distributions():
    aug = MultiCropAugment(small_twist())
    group, m = aug.spec.groups[0], 20000
    p = aug._sample(group, torch.tensor([[64, 64]]), m, gen())
    f = p[:, aug._FACT]
    for j, v in enumerate(group.jitter[:3]):
        assert f[:, j].min() >= 1 - v and f[:, j].max() <= 1 + v and abs(f[:, j].mean() - 1) < 0.01
    assert f[:, 3].abs().max() <= group.jitter[3] and abs(f[:, 3].mean()) < 0.005
    order = p[:, aug._ORDER].long()
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(m, 4))
    assert order.unique(dim=0).shape[0] == 24                # a permutation per sample, not per batch
    at_pos = torch.stack([(order == op).double().mean(0) for op in range(4)])   # (op, position)
    assert (at_pos - 0.25).abs().max() < 0.02
    sigma = p[:, aug._SIGMA]
    assert sigma.min() >= group.blur_sigma[0] and sigma.max() <= group.blur_sigma[1]


def _detected(spec, baseline, images, tol=1e-4):
    """Per view: boolean (N,) of samples that differ from the all-ops-off baseline (same seed)."""
    out = MultiCropAugment(spec)(images, gen(7))
    return [(o - b).abs().flatten(1).amax(1) > tol for o, b in zip(out, baseline)]


@pytest.mark.parametrize("op", ["flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"])
def test_op_frequencies_per_group(op):
    """Estimate how often each op fires per view group of the official recipe; the engine draws the
    same numbers whatever the probabilities, so an A/B against the all-off spec (same seed) isolates
    one op per sample."""
    spec = MultiCropSpec.twist(global_size=16, local_size=8, num_local=4)
    if op == "blur_p":                                       # sigma >= 1 so every blur is visible
        spec = replace(spec, groups=tuple(replace(g, blur_sigma=(1.0, 2.0)) for g in spec.groups))
    if op in ("blur_p", "solarize_p"):                       # the official per-group recipe
        assert [getattr(g, op) for g in spec.groups] == ([1.0, 0.1, 0.5] if op == "blur_p" else [0.0, 0.2, 0.0])
    images, n = noise_images(2000), 2000
    baseline = MultiCropAugment(only(spec))(images, gen(7))
    enabled = only(spec, {i: {op: getattr(g, op)} for i, g in enumerate(spec.groups)})
    fired = _detected(enabled, baseline, images)
    start = 0
    for g in spec.groups:
        rate = torch.cat(fired[start:start + g.count]).double().mean().item()
        start += g.count
        p, m = getattr(g, op), g.count * n
        assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / m) + 1e-9, (op, g, rate)  # p=0 or 1: exact


def test_views_differ_and_seeding_is_reproducible():
    images = noise_images(8, sizes=((60, 60),))
    images[1] = images[0].clone()                            # same image twice in the batch
    aug = MultiCropAugment(small_twist(num_local=3))
    a, b, c = aug(images, gen(11)), aug(images, gen(11)), aug(images, gen(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(not torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.allclose(a[0], a[1])                    # the two global views
    assert not torch.allclose(a[2], a[3]) and not torch.allclose(a[3], a[4])
    for v in a:                                              # per-sample randomness
        assert not torch.allclose(v[0], v[1])
        assert torch.isfinite(v).all()


# ------------------------------------------------------------------ CPU vs CUDA: float16 intermediates
def fp16_engine_bound(spec) -> float:
    """The largest difference between a view made on CUDA (float16 intermediates: `work_dtype`'s default there)
    and on the CPU (float32), same seed, in normalized units; max over a pixel's channels throughout.

    The CUDA path stores float16 four times (the compiled crop, then the Triton kernels; the compiled path
    without triton rounds at the same points), each rounding to nearest, by at most half an ulp (11 bits):
      1. the crop's row pass, in uint8 units (< 256, ulp 2^-3): 2^-4 / 255 in [0, 1] units (the column pass
         is a convex combination: triangle taps >= 0 summing to 1, so it adds nothing);
      2. the crop, in [0, 1]: 2^-12;
      3. the colour-jitter and grayscale result: 2^-12;
      4. the row-blurred image: 2^-12 (the column pass is convex again).
    Errors 1-2 pass through colour jitter, whose ops are Lipschitz: brightness f <= 1 + b; contrast and
    saturation, blends with a luma mean / luma (weights summing to 1), f + |1 - f| <= 1 + 2c, 1 + 2s; hue
    rotation 3 (piecewise linear: on each piece the middle channel is (1-a) max + (a+-1) min -+ mid with
    |1 - a| + |a +- 1| = 2; max and min are kept); clamps 1. Grayscale (weights sum to 0.9999), solarize
    (continuous at 0.5) and the convex blur add no growth. Normalizing divides by std. fp32 arithmetic that
    differs between the two (sum order, the GPU's approximate exp and division) is allowed 40 roundings of
    values <= 1 (more than the chain has) of 2^-23 each before the stores, amplified alike.
    TWIST (jitter 0.4, 0.4, 0.2, 0.1; std >= 0.224): L = 1.4 * 1.8 * 1.4 * 3 = 10.6, bound 0.0255."""
    lip = 1.0
    for g in spec.groups:
        if g.count > 0 and g.jitter_p > 0:
            b, c, s, h = g.jitter
            lip = max(lip, (1 + b) * (1 + 2 * c) * (1 + 2 * s) * (3 if h > 0 else 1))
    crop, store, fp32 = 2 ** -4 / 255 + 2 ** -12, 2 ** -12, 40 * 2 ** -23
    return (lip * (crop + fp32) + 2 * store) / min(spec.std)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree_for_same_seed():
    """The same views on both devices, up to the CUDA engine's float16 intermediates (`fp16_engine_bound`;
    the 2e-3 this test had is exceeded where they are simulated, below)."""
    spec, images = small_twist(num_local=2), noise_images(6)
    aug = MultiCropAugment(spec)
    cpu = aug(images, gen(3))
    cuda = aug([im.cuda() for im in images], gen(3))
    for x, y in zip(cpu, cuda):
        assert y.is_cuda
        torch.testing.assert_close(y.cpu(), x, atol=fp16_engine_bound(spec), rtol=0)


def test_fp16_bound_holds_where_cuda_intermediates_are_simulated(monkeypatch):
    """The comparison above without a GPU: the engine's fused formulation (what CUDA compiles; torch.compile made
    a plain call) with work_dtype float16 rounds at the same four points as the CUDA path. Over three seeds its
    views stay within `fp16_engine_bound` of the float32 ones, and every seed exceeds 2e-3 somewhere, so the old
    tolerance would fail on a GPU (measured here: 4.8e-3 to 6.4e-3 over ten seeds, about 1% of values > 2e-3)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    spec, images = small_twist(num_local=2), noise_images(6)
    ref = MultiCropAugment(spec)                                       # the CPU: eager, float32
    sim = MultiCropAugment(spec, compile=True, use_triton=False, work_dtype=torch.float16)
    worst = [max((a - b).abs().max().item() for a, b in zip(sim(images, gen(seed)), ref(images, gen(seed))))
             for seed in range(3)]
    assert max(worst) <= fp16_engine_bound(spec), worst
    assert min(worst) > 2e-3, worst


# ------------------------------------------------------------------------------ fused / compiled path, transfers
def _one_group(**kw):
    """Global view 2 of the recipe (every op: jitter, gray, blur, solarize), small."""
    spec = small_twist(num_local=0, **kw)
    return replace(spec, groups=spec.groups[1:2])


def _group_inputs(spec, images, seed=3):
    aug = MultiCropAugment(spec)
    flat, meta = source_meta(images)
    g = spec.groups[0]
    q = aug._sample(g, meta[:, 1:3], len(images), gen(seed))
    q[:, aug._BLUR], q[:, aug._SOL] = torch.arange(len(images)) % 2, torch.arange(len(images)) % 3 == 0
    p = torch.cat([q.double(), meta.double()], 1)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.mean, spec.std))
    return flat, p, g, int(meta[0, 5]), mean, std, q


@pytest.mark.parametrize("canvas", [False, True])
def test_fused_formulation_matches_eager(canvas):
    """The fused formulation (what torch.compile gets: sums of gathers, shifted slices) equals the eager one
    (matmul, convolution), with bucketed (larger) tap counts and widths, from a list or a channels-last canvas."""
    images = noise_images(6)
    src = images
    if canvas:
        src = torch.zeros(6, 3, 64, 64, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        for c, im in zip(src, images):
            c[:, :im.shape[1], :im.shape[2]] = im
    flat, p, g, xstep, mean, std, q = _group_inputs(_one_group(), images)
    if canvas:
        flat, meta = source_meta(src)
        p[:, 18:] = meta.double()
        p[:, 19:21] = torch.tensor([im.shape[-2:] for im in images]).double()
        xstep = int(meta[0, 5])
    args = (mean, std, torch.float32, True, torch.float32)
    eager = group_views(flat, p, g, tap_counts(q[:, :4], g.size), xstep, *args, False)
    fused = group_views(flat, p, g, tap_counts(q[:, :4], g.size, bucket=True), xstep, *args, True)
    torch.testing.assert_close(fused, eager, atol=2e-5, rtol=0)


def test_compiled_group_matches_eager():
    """torch.compile (Inductor's CPU backend) of one view group against the eager reference."""
    images = noise_images(3, sizes=((24, 30), (30, 20)))
    spec = replace(_one_group(), groups=(replace(_one_group().groups[0], size=12),))
    flat, p, g, xstep, mean, std, q = _group_inputs(spec, images)
    args = (tap_counts(q[:, :4], g.size, bucket=True), xstep, mean, std, torch.float32, False, torch.float32)
    compiled = torch.compile(group_views, dynamic=False, fullgraph=True)(flat, p, g, *args, True)
    torch.testing.assert_close(compiled, group_views(flat, p, g, *args, False), atol=2e-5, rtol=0)


def test_one_engine_call_copies_one_table_to_the_device_and_never_syncs():
    """On the 'meta' device (no data, so any host sync would raise), a steady-state call at the real recipe's
    shapes makes exactly one host-to-device copy: the per-batch parameter table (pinned on CUDA). Ops and bytes
    are counted by the project's tool."""
    from tools.profile_ops import count_eager, images, make_engine
    spec = MultiCropSpec.twist(global_size=224, local_size=96, num_local=6)
    res = count_eager(make_engine(spec, compile=False), images(8, "meta"))
    assert [c["shape"] for c in res["h2d_copies"]] == [[8 * spec.num_views, 25]]
    assert res["syncs"] == 0
    assert res["launches"]["outside"] <= 5                  # flat buffer, table, nothing per image
    out_bytes = 8 * 3 * sum(s * s for s in spec.view_sizes()) * 4
    assert res["bytes_written"]["group"] > out_bytes       # counted: at least the views themselves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_never_syncs_the_host():
    """Eager and compiled engine calls on CUDA under sync debug mode 'error' (a sync raises), after a warm-up
    that makes the per-device constants and compiles."""
    images = [im.cuda() for im in noise_images(6)]
    for compile in (False, True):
        aug = MultiCropAugment(small_twist(num_local=2), out_dtype=torch.bfloat16, compile=compile)
        aug(images, gen(1))
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = aug(images, gen(2))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert all(o.is_cuda and o.dtype == torch.bfloat16 for o in out)
