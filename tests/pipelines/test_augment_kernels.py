"""The Triton photometric kernels (`pipelines.augment.kernels`) against the eager reference
(`augment.engine.group_photometric` / the eager engine): on the CPU through Triton's interpreter, run once in a
subprocess (`triton_interp.py`); on CUDA compiled, when a GPU is present."""
import itertools
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipelines.augment import kernels as pk
from pipelines.augment.engine import _COLS, MultiCropAugment, group_photometric
from pipelines.spec import MultiCropSpec, ViewGroup

pytestmark = pytest.mark.skipif(not pk.AVAILABLE, reason="triton is not importable")
ROOT = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FULL = ViewGroup(size=10, blur_p=0.5, solarize_p=0.2)                         # every op, hue included
NO_HUE_NO_BLUR = ViewGroup(size=10, jitter=(0.4, 0.4, 0.2, 0.0), blur_p=0.0, solarize_p=0.2)


def _table(m: int, size: int, seed: int = 0) -> torch.Tensor:
    """A (m, 25) float64 table: every one of the 24 jitter orders (so contrast at every position), jitter off for
    two samples, grayscale, blur (sigma 0.1-2) and solarize on different subsets."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(m, 25, dtype=torch.float64)
    i = torch.arange(m)
    p[:, _COLS["jit"]] = ((i != 0) & (i != 7)).double()
    f = _COLS["fact"]
    p[:, f:f + 3] = 0.6 + 0.8 * torch.rand(m, 3, generator=g, dtype=torch.float64)
    p[:, f + 3] = 0.2 * torch.rand(m, generator=g, dtype=torch.float64) - 0.1
    p[:, f + 3][1] = 0.5                                                  # the largest hue turn
    perms = torch.tensor(list(itertools.permutations(range(4))), dtype=torch.float64)
    p[:, _COLS["order"]:_COLS["order"] + 4] = perms[i % 24]
    p[:, _COLS["gray"]] = (i % 5 == 1).double()
    p[:, _COLS["blur"]] = (i % 2).double()
    p[:, _COLS["sigma"]] = 0.1 + 1.9 * torch.rand(m, generator=g, dtype=torch.float64)
    p[:, _COLS["sol"]] = (i % 3 == 0).double()
    return p


def _crops(m: int, size: int, seed: int = 1) -> torch.Tensor:
    x = torch.rand(m, 3, size, size, generator=torch.Generator().manual_seed(seed))
    x[:, :, :2] = 0.5                                                     # grey pixels: hue undefined
    x[:, 0, 2:4] = 1.0                                                    # saturated and clipped values
    return x


def _images(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in [(30, 40), (40, 26)] * n][:n]


def _cases() -> dict:
    x, p = _crops(24, 10), _table(24, 10)
    base = dict(kind="photometric", x=x, p=p, mean=MEAN, std=STD, tmp_dtype=torch.float32)
    spec = MultiCropSpec.twist(global_size=20, local_size=12, num_local=2)
    engine = dict(kind="engine", spec=spec, images=_images(5), seed=3, tmp_dtype=None)
    return {
        "full_fp32": {**base, "group": FULL, "out_dtype": torch.float32, "channels_last": False},
        "full_bf16_cl": {**base, "group": FULL, "out_dtype": torch.bfloat16, "channels_last": True},
        "full_fp16_tmp": {**base, "group": FULL, "out_dtype": torch.float32, "channels_last": False,
                          "x": x.half(), "tmp_dtype": torch.float16},
        "no_hue_no_blur": {**base, "group": NO_HUE_NO_BLUR, "out_dtype": torch.float32, "channels_last": True},
        "engine_fp32": {**engine, "out_dtype": torch.float32, "channels_last": True},
        "engine_bf16": {**engine, "out_dtype": torch.bfloat16, "channels_last": False},
    }


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """(cases, outputs of the Triton kernels under the interpreter), one subprocess for all cases."""
    d = tmp_path_factory.mktemp("triton_interp")
    cases = _cases()
    torch.save(cases, d / "cases.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interp.py")), str(d / "cases.pt"),
                          str(d / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return cases, torch.load(d / "out.pt", weights_only=False)


def _reference(c: dict) -> torch.Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (c["mean"], c["std"]))
    return group_photometric(c["x"].float(), c["p"], c["group"], mean, std, torch.float32, False, torch.float32,
                             False)


@pytest.mark.parametrize("name", ["full_fp32", "no_hue_no_blur"])
def test_kernels_equal_eager_chain_fp32(interpreted, name):
    """Every jitter order (contrast's mean taken after the ops before it), hue, grayscale, blur, solarize,
    normalize: float32 out equals the eager reference to float32 rounding."""
    cases, out = interpreted
    c, y = cases[name], out[name]
    assert y.dtype == torch.float32 and y.shape == c["x"].shape
    assert y.is_contiguous(memory_format=torch.channels_last if c["channels_last"] else torch.contiguous_format)
    torch.testing.assert_close(y, _reference(c), atol=2e-5, rtol=0)


def test_kernels_bf16_channels_last_within_bf16_rounding(interpreted):
    cases, out = interpreted
    c, y = cases["full_bf16_cl"], out["full_bf16_cl"]
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    # one bf16 ulp: Triton's interpreter casts float32 -> bf16 by truncation (a GPU rounds to nearest)
    torch.testing.assert_close(y.float(), _reference(c), atol=1e-5, rtol=2 ** -7)


def test_kernels_with_float16_intermediates(interpreted):
    """The CUDA default stores the colour result and the row-blurred image in float16 (every sample: the blur
    kernel copies the unblurred ones). The reference starts from the same float16 crops, so the difference is
    those two roundings to nearest of values in [0, 1], 2^-12 each at most (the column pass is convex; solarize,
    continuous at 0.5, does not grow them), divided by the smallest std, plus the fp32 chain's 2e-5 (above)."""
    cases, out = interpreted
    c, y = cases["full_fp16_tmp"], out["full_fp16_tmp"]
    err = (y - _reference(c)).abs().flatten(1).amax(1)
    blurred = c["p"][:, _COLS["blur"]] > 0
    assert err[~blurred].max() <= 2 ** -12 / min(STD) + 2e-5          # one rounding: the copy is exact
    assert err[blurred].max() <= 2 * 2 ** -12 / min(STD) + 2e-5
    assert err.max() > 2 ** -13 / min(STD)                             # the intermediates really are float16


@pytest.mark.parametrize("name", ["engine_fp32", "engine_bf16"])
def test_engine_triton_path_equals_eager_engine(interpreted, name):
    """The whole engine (eager crop + Triton photometric chain) against the eager engine, same seed."""
    cases, out = interpreted
    c = cases[name]
    ref = MultiCropAugment(c["spec"], out_dtype=torch.float32, channels_last=c["channels_last"], compile=False,
                           use_triton=False)(c["images"], torch.Generator().manual_seed(c["seed"]))
    assert len(out[name]) == len(ref) == c["spec"].num_views
    for y, r in zip(out[name], ref):
        assert y.dtype == c["out_dtype"] and y.shape == r.shape
        if c["out_dtype"] == torch.float32:
            torch.testing.assert_close(y, r, atol=2e-5, rtol=0)
        else:
            torch.testing.assert_close(y.float(), r, atol=1e-5, rtol=2 ** -7)   # truncated to bf16, as above


def test_launches_and_bytes_recorded_on_meta():
    """On the meta device nothing runs; each launch is recorded with the bytes of the tensors it writes: contrast
    means, the colour result and the row-blurred image in tmp_dtype, the output."""
    m, s = 6, 32
    x = torch.empty(m, 3, s, s, dtype=torch.float16, device="meta")
    p = torch.empty(m, 25, dtype=torch.float64, device="meta")
    with pk.record_launches() as rec:
        y = pk.photometric(x, p, FULL, _COLS, MEAN, STD, torch.bfloat16, True, torch.float16)
    assert y.device.type == "meta" and y.is_contiguous(memory_format=torch.channels_last)
    assert [r["kernel"] for r in rec] == ["_contrast_mean_kernel", "_colour_kernel", "_blur_kernel", "_blur_kernel"]
    assert [r["bytes_written"] for r in rec] == [m * 4] + [m * 3 * s * s * 2] * 3
    with pk.record_launches() as rec:
        pk.photometric(x, p, replace(NO_HUE_NO_BLUR, size=s, jitter_p=0.0), _COLS, MEAN, STD, torch.bfloat16, True,
                       torch.float16)
    assert [r["kernel"] for r in rec] == ["_colour_kernel"]                # no jitter, no blur: one pass


def test_opcount_counts_the_triton_path_on_meta():
    """tools/profile_ops.py's meta count of the CUDA engine: 4 Triton launches per view group of the official recipe
    (contrast mean, colour, two blur passes), writing the bf16 views once plus two float16 intermediates."""
    from tools.profile_ops import count_eager, images, make_engine
    spec = MultiCropSpec.twist(global_size=224, local_size=96, num_local=6)
    res = count_eager(make_engine(spec, compile=False, triton=True), images(4, "meta"))
    assert res["triton_kernels"] == {"_contrast_mean_kernel": 3, "_colour_kernel": 3, "_blur_kernel": 6}
    pixels = 4 * 3 * sum(s * s for s in spec.view_sizes())
    assert res["triton_bytes_written"] == pixels * (2 + 2 + 2) + 4 * spec.num_views * 4
    assert res["launches"]["outside"] <= 5 and res["syncs"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_triton_engine_equals_eager_engine(compile):
    spec = MultiCropSpec.twist(global_size=32, local_size=16, num_local=2)
    images = [im.cuda() for im in _images(6)]
    ref = MultiCropAugment(spec, out_dtype=torch.float32, compile=False, use_triton=False)(
        images, torch.Generator().manual_seed(5))
    out = MultiCropAugment(spec, out_dtype=torch.bfloat16, compile=compile, use_triton=True,
                           work_dtype=torch.float32)(images, torch.Generator().manual_seed(5))
    for y, r in zip(out, ref):
        assert y.is_cuda and y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), r, atol=2e-3, rtol=2 ** -8)


def _compile_sm90(kernel, pointers: dict, constexprs: dict):
    """Compile a kernel for sm_90 (H100/H200) on the CPU (triton's bundled ptxas; no GPU); its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n[0] in "ms" and n[1:].isdigit() else "i32")
           for n in kernel.arg_names}
    k = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": pk.NUM_WARPS})
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"fasttwist_{kernel.__name__}_{os.getpid()}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    try:
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    finally:
        cubin.unlink()
    return dict(kv.split(":") for kv in usage.strip().splitlines()[-1].split() if kv.count(":") == 1)


def _has_ptxas() -> bool:
    return pk.AVAILABLE and (Path(pk.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _has_ptxas(), reason="triton's bundled ptxas is missing")
def test_kernels_compile_for_sm90_without_spills():
    """What the interpreter cannot show: each kernel, as the official recipe instantiates it, lowers through
    Triton's compiler and ptxas for sm_90, and keeps its values in registers (no stack, no local memory)."""
    cols = {"COL_" + k.upper(): v for k, v in _COLS.items()}
    ptr = {"x_ptr": "*fp16", "p_ptr": "*fp64", "mean_ptr": "*fp32"}
    variants = [
        (pk._contrast_mean_kernel, ptr, dict(HUE=True, S=224)),          # S: the global views
        (pk._colour_kernel, {**ptr, "o_ptr": "*fp16"}, dict(JITTER=True, CONTRAST=True, HUE=True, GRAY=True,
                                                             FINAL=False, SOLARIZE=False)),
        (pk._colour_kernel, {**ptr, "o_ptr": "*bf16"}, dict(JITTER=True, CONTRAST=True, HUE=True, GRAY=True,
                                                             FINAL=True, SOLARIZE=True)),
        (pk._blur_kernel, {**ptr, "o_ptr": "*fp16"}, dict(AXIS=1, MAX_HALF=6, FINAL=False, SOLARIZE=True)),
        (pk._blur_kernel, {**ptr, "o_ptr": "*bf16"}, dict(AXIS=0, MAX_HALF=6, FINAL=True, SOLARIZE=True)),
    ]
    for kernel, pointers, consts in variants:
        consts = {**{k: v for k, v in cols.items() if k in kernel.arg_names}, **consts, "BLOCK": pk.BLOCK}
        usage = _compile_sm90(kernel, pointers, consts)
        assert usage["STACK"] == "0" and usage["LOCAL"] == "0", (kernel.__name__, consts, usage)
        assert int(usage["REG"]) <= 128, (kernel.__name__, usage)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kernel_count_within_budget():
    """torch.profiler's count of the CUDA engine's kernels for one call of the official recipe (small batch: the
    count does not depend on it) stays within the engine's budget of 60 launches per batch."""
    from tools.profile_ops import count_cuda, images, make_engine
    spec = MultiCropSpec.twist(global_size=224, local_size=96, num_local=6)
    res = count_cuda(make_engine(spec, compile=True, triton=True), [im.cuda() for im in images(8, "cpu")],
                     repeats=1)
    assert 12 <= res["kernels"] <= 60, res
