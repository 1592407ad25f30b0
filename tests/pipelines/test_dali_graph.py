"""The DALI augmentation graph (CPU mode) against the spec and torchvision: crop windows, op frequencies per view
group, colour-op semantics, normalization, independence of views."""
import io
import math
from dataclasses import replace

import numpy as np
import nvidia.dali.fn as fn
import nvidia.dali.types as types
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from nvidia.dali import pipeline_def
from PIL import Image
from scipy.stats import ks_2samp
from torchvision.transforms import RandomResizedCrop

from pipelines.dali_graph import multicrop
from pipelines.spec import MultiCropSpec, ViewGroup

OPS_OFF = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def png(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def run(encoded: list[np.ndarray], spec: MultiCropSpec, seed: int = 0, fused: bool = False) -> list[np.ndarray]:
    """Every view of `spec` for a batch of encoded images: float32 (N, S, S, 3), normalized."""
    @pipeline_def(enable_conditionals=True)
    def definition():
        enc = fn.external_source(source=lambda: encoded, batch=True)
        return tuple(multicrop(enc, spec, types.FLOAT, gpu=False, fused=fused))

    pipe = definition(batch_size=len(encoded), num_threads=2, device_id=None, seed=seed, prefetch_queue_depth=1)
    pipe.build()
    out = [np.array(o.as_tensor()) for o in pipe.run()]
    del pipe
    return out


def only(spec, probs=None):
    probs = probs or {}
    return replace(spec, groups=tuple(replace(g, **{**OPS_OFF, **probs.get(i, {})}) for i, g in enumerate(spec.groups)))


def raw(spec):
    """Views in 0..255 pixel units: unit mean, 1/255 std."""
    return replace(spec, mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)


# ------------------------------------------------------------------------------------------ crop windows
H, W = 180, 240
_yy, _xx = np.mgrid[0:H, 0:W]
RAMP = png(np.stack([_xx, _yy, np.zeros_like(_xx)], -1).astype(np.uint8))   # red = column, green = row


def windows(view: np.ndarray) -> np.ndarray:
    """(N, 4) crop windows (x1, y1, w, h) recovered from views of RAMP: a linear fit of the red values along
    the middle row (green along the middle column) over the interior, where resampling is exactly linear.
    A mirrored view has a negative width."""
    s = view.shape[1]
    j = np.arange(s)[s // 4:3 * s // 4]
    A = np.c_[np.ones_like(j), j]
    out = []
    for ch, line in ((0, view[:, s // 2, :, 0]), (1, view[:, :, s // 2, 1])):
        (a, b), *_ = np.linalg.lstsq(A, line[:, s // 4:3 * s // 4].T, rcond=None)
        out += [a - 0.5 * b + 0.5, b * s]
    return np.stack([out[0], out[2], out[1], out[3]], 1)


def test_normalization_per_group():
    spec = only(replace(MultiCropSpec.twist(global_size=16, local_size=8, num_local=2), mean=(0.1, 0.5, 0.9),
                        std=(0.2, 0.3, 0.4)))
    rgb = np.array([200, 30, 120], np.uint8)
    imgs = [png(np.broadcast_to(rgb, (h, w, 3)).copy()) for h, w in [(40, 60), (70, 33)]]
    expected = (rgb / 255 - np.array(spec.mean)) / np.array(spec.std)
    for v in run(imgs, spec):
        np.testing.assert_allclose(v, np.broadcast_to(expected, v.shape), atol=1e-4)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_windows_match_torchvision(scale, fused):
    n, ratio = 400, (3 / 4, 4 / 3)
    spec = MultiCropSpec(groups=(ViewGroup(count=1, size=64, scale=scale, ratio=ratio, **OPS_OFF),),
                         mean=(0.0, 0.0, 0.0), std=(1 / 255,) * 3)
    box = windows(run([RAMP] * n, spec, seed=1, fused=fused)[0])     # about +-0.5 px: views are uint8
    assert (box[:, :2] > -1.5).all() and (box[:, 0] + box[:, 2] < W + 1.5).all()
    assert (box[:, 1] + box[:, 3] < H + 1.5).all()
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(1, H, W), list(scale), list(ratio))
                    for _ in range(3000)], float)                     # (i, j, h, w)
    ours = [box[:, 2] * box[:, 3] / (H * W), np.log(box[:, 2] / box[:, 3]), (box[:, 0] + box[:, 2] / 2) / W,
            (box[:, 1] + box[:, 3] / 2) / H]
    theirs = [ref[:, 2] * ref[:, 3] / (H * W), np.log(ref[:, 3] / ref[:, 2]), (ref[:, 1] + ref[:, 3] / 2) / W,
              (ref[:, 0] + ref[:, 2] / 2) / H]
    for a, b in zip(ours, theirs):                                    # area, log aspect, centre x, centre y
        assert ks_2samp(a, b).pvalue > 1e-3
        assert abs(a.mean() - b.mean()) < 4 * math.sqrt((a.var() + b.var()) / n)


def test_views_use_their_own_crop_windows_and_flips():
    """The reported DALI pitfall: one crop window reused across local views. Every view of every sample must get
    its own window; flips are per view and per sample too."""
    spec = raw(only(MultiCropSpec.twist(global_size=32, local_size=32, num_local=6), {0: {"flip_p": 0.5},
                                                                                      1: {"flip_p": 0.5},
                                                                                      2: {"flip_p": 0.5}}))
    n = 60
    boxes = np.stack([windows(v) for v in run([RAMP] * n, spec, seed=3)], 1)   # (N, views, 4)
    flipped = boxes[:, :, 2] < 0
    assert 0.3 < flipped.mean() < 0.7 and 0 < flipped.mean(1).mean() and len({tuple(r) for r in flipped}) > 10
    boxes[:, :, 2] = np.abs(boxes[:, :, 2])
    boxes[:, :, 0] = np.where(flipped, boxes[:, :, 0] - boxes[:, :, 2], boxes[:, :, 0])
    for views in boxes:                                              # 8 distinct windows per sample
        gap = np.abs(views[:, None] - views[None]).max(-1) + 10 * np.eye(len(views))
        assert gap.min() > 1.5
    gap = np.abs(boxes[:, None, 2] - boxes[None, :, 2]).max(-1) + 10 * np.eye(n)
    assert (gap.min(1) > 1.5).mean() > 0.9                            # and differ across samples


# --------------------------------------------------------------------------------------- op frequencies
def noise_images(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def whole_image(spec):
    """Crops that always take the whole (square) image: views are deterministic unless an op fires."""
    return replace(spec, groups=tuple(replace(g, scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_sigma=(1.0, 2.0))
                                      for g in spec.groups))


@pytest.mark.parametrize("op", ["flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"])
def test_op_frequencies_per_group(op):
    spec = whole_image(MultiCropSpec.twist(global_size=16, local_size=8, num_local=4))
    if op in ("blur_p", "solarize_p"):                                # the official per-group recipe
        assert [getattr(g, op) for g in spec.groups] == ([1.0, 0.1, 0.5] if op == "blur_p" else [0.0, 0.2, 0.0])
    images = noise_images(8) * 60
    n = len(images)
    base = run(images, only(spec))
    out = run(images, only(spec, {i: {op: getattr(g, op)} for i, g in enumerate(spec.groups)}), seed=11)
    start = 0
    for g in spec.groups:
        vs = range(start, start + g.count)
        start += g.count
        if op == "flip_p":
            fired = [np.abs(out[v] - base[v][:, :, ::-1]).reshape(n, -1).max(1) < 1e-4 for v in vs]
        else:
            fired = [np.abs(out[v] - base[v]).reshape(n, -1).max(1) > 1e-3 for v in vs]
        rate, p, m = np.concatenate(fired).mean(), getattr(g, op), g.count * n
        assert abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / m) + 1e-9, (op, g, rate)


# ------------------------------------------------------------------------------------- op semantics
def _identity_spec(**ops):
    g = ViewGroup(count=1, size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), **{**OPS_OFF, **ops})
    return MultiCropSpec(groups=(g,), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))   # views in [0, 1]


@pytest.fixture(scope="module")
def colour_inputs():
    rng = np.random.default_rng(5)
    ranges = [(0, 256), (0, 120), (100, 256), (30, 200)]             # dark and bright images: mean luma != 0.5
    arrs = [rng.integers(*ranges[i % 4], (16, 16, 3), dtype=np.uint8) for i in range(12)]
    arrs[0][:4] = 128                                                  # some grey pixels
    return [png(a) for a in arrs], torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255


def test_identity_crop_is_exact(colour_inputs):
    enc, x = colour_inputs
    y = torch.from_numpy(run(enc, _identity_spec())[0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which,theirs", [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                         (2, TF.adjust_saturation)])
def test_linear_jitter_ops_follow_torchvision(colour_inputs, which, theirs):
    """Brightness, contrast (around the mean luma) and saturation (blend with luma) as torchvision: the factor of
    each sample is recovered by a fit, the output must then equal torchvision's for that factor."""
    enc, x = colour_inputs
    jitter = [0.0] * 4
    jitter[which] = 0.4 if which < 2 else 0.2
    y = torch.from_numpy(run(enc, _identity_spec(jitter_p=1.0, jitter=tuple(jitter)), seed=2)[0]).permute(0, 3, 1, 2)
    factors = []
    for xi, yi in zip(x, y):
        best = min(np.linspace(1 - jitter[which], 1 + jitter[which], 801),
                   key=lambda f: float((theirs(xi, float(f)) - yi).abs().mean()))
        factors.append(best)
        torch.testing.assert_close(yi, theirs(xi, float(best)), atol=4e-3, rtol=0)
    assert np.std(factors) > 0.05                                     # per-sample factors


def test_grayscale_solarize_blur_follow_torchvision(colour_inputs):
    enc, x = colour_inputs
    y = torch.from_numpy(run(enc, _identity_spec(gray_p=1.0))[0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, TF.rgb_to_grayscale(x, 3), atol=2 / 255, rtol=0)
    y = torch.from_numpy(run(enc, _identity_spec(solarize_p=1.0))[0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, TF.solarize(x, 0.5), atol=1e-5, rtol=0)
    y = torch.from_numpy(run(enc, _identity_spec(blur_p=1.0, blur_sigma=(1.5, 1.5)))[0]).permute(0, 3, 1, 2)
    torch.testing.assert_close(y, TF.gaussian_blur(x, [11, 11], [1.5, 1.5]), atol=0.6 / 255, rtol=0)


def test_hue_is_a_luma_preserving_rotation(colour_inputs):
    """The documented difference: DALI rotates hue in YIQ (luma kept), not in HSV as torchvision."""
    enc, x = colour_inputs
    y = torch.from_numpy(run(enc, _identity_spec(jitter_p=1.0, jitter=(0.0, 0.0, 0.0, 0.1)), seed=4)[0])
    y = y.permute(0, 3, 1, 2)
    assert (y - x).abs().flatten(1).amax(1).min() > 0.01               # every sample changed
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    inside = ((y > 0.002) & (y < 0.998)).all(1, keepdim=True)          # away from clipping
    diff = ((y - x) * luma).sum(1, keepdim=True)
    assert diff[inside].abs().max() < 2e-3


# ------------------------------------------------------------------------------------------ randomness
def test_views_differ_and_seeding_is_reproducible():
    spec = MultiCropSpec.twist(global_size=24, local_size=12, num_local=3)
    images = noise_images(6, size=40)
    images[1] = images[0]                                              # the same image twice in the batch
    a, b, c = run(images, spec, seed=7), run(images, spec, seed=7), run(images, spec, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert all(not np.allclose(x, y) for x, y in zip(a, c))
    assert not np.allclose(a[0], a[1])                                 # the two global views
    assert not np.allclose(a[2], a[3]) and not np.allclose(a[3], a[4])
    for v in a:
        assert not np.allclose(v[0], v[1]) and np.isfinite(v).all()


# ------------------------------------------------------------------------------------------ GPU variant
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_variant_builds_with_every_image_op_on_the_gpu(fused):
    """Without CUDA the GPU pipeline cannot run, but its graph can be built: DALI rejects GPU data used as a
    per-sample argument (which must come from the CPU) at this point, and the placement of each op is visible.
    (Uses DALI 2.4's private `_build_graph`/`_ops`.)"""
    @pipeline_def(enable_conditionals=True)
    def definition():
        enc, _ = fn.readers.file(files=["unused.jpg"], labels=[0])
        return tuple(multicrop(enc, MultiCropSpec.twist(), types.FLOAT16, gpu=True, fused=fused))

    pipe = definition(batch_size=2, num_threads=1, device_id=0)
    pipe._build_graph()
    placed = {}
    for op in pipe._ops:
        spec = str(op.spec)
        name = spec.splitlines()[0].split()[-1].rstrip(":")
        placed.setdefault(name, set()).add(spec.split("device: ", 1)[1].split()[0])
    decoder = "decoders__ImageRandomCrop" if fused else "decoders__Image"
    assert placed[decoder] == {"mixed"}
    image_ops = ["ColorTwist", "GaussianBlur", "LookupTable", "CropMirrorNormalize", "reductions__Mean",
                 "Resize" if fused else "RandomResizedCrop"]
    for name in image_ops:
        assert placed[name] == {"gpu"}, (name, placed[name])
    assert placed["random__Uniform"] == placed["random__CoinFlip"] == {"cpu"}


def test_gpu_decoder_settings_reach_the_decoder():
    """data.dali.hw_decoder_load / preallocate / memory_padding arrive as the mixed decoder's arguments
    (the CPU decoder takes none of them)."""
    from pipelines.dali_graph import mixed_decoder_args
    args = mixed_decoder_args(0.97, (640, 480), (1 << 20, 1 << 19))

    @pipeline_def(enable_conditionals=True)
    def definition():
        enc, _ = fn.readers.file(files=["unused.jpg"], labels=[0])
        return tuple(multicrop(enc, MultiCropSpec.twist(), types.FLOAT16, gpu=True, mixed_args=args))

    pipe = definition(batch_size=2, num_threads=1, device_id=0)
    pipe._build_graph()
    spec = next(str(op.spec) for op in pipe._ops if "decoders__Image" in str(op.spec).splitlines()[0])
    for line in ("device: mixed", "hw_decoder_load: 0.970000", "preallocate_width_hint: 640",
                 "preallocate_height_hint: 480", "device_memory_padding: 1048576", "host_memory_padding: 524288"):
        assert f"    {line}\n" in spec, line

