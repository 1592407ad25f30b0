"""Count what the multi-crop augmentation engine costs per batch, on the CPU, without running a GPU.

Two measurements of one engine call (`pipelines.augment.engine.MultiCropAugment`, decode excluded):

- eager, on the `meta` device (shapes only, so the real recipe at batch 128 costs nothing): every op the engine
  dispatches on the images' device, through a TorchDispatchMode counter. Ops that launch a kernel (not views,
  not allocations) and the bytes of every tensor they produce; host-to-device copies (a CPU tensor copied to the
  images' device; pageable unless pinned) and host syncs (`.item()` of a device tensor; meta refuses them
  outright). Host-side work (drawing the random parameters on the CPU) is not device work and is not counted.
  Ops inside `augment.engine.group_views` (the per-view-group function that is compiled on CUDA) are counted apart.
- `--compiled`: the same call on real CPU tensors with the group function under torch.compile: the kernels
  Inductor generates for it (`torch._inductor.metrics.generated_kernel_count`, plus extern kernels) and the bytes
  its kernels write (summed over Inductor's scheduler nodes). Inductor's C++ backend fuses differently from its
  Triton (CUDA) backend, so these counts approximate the GPU's; torch.profiler on a GPU gives the real ones.

- `--triton`: the engine as it runs on CUDA with triton importable: crops from `augment.engine.stored_crop` (eager on
  meta; with `--compiled`, Inductor-compiled on the CPU and counted as above) and the photometric chain as Triton
  kernels (`pipelines.augment.kernels`). Those kernels are counted from their launch calls, not run: one launch
  per call, bytes written = the bytes of the tensors the kernel stores into (each written exactly once; reads are
  not counted). This is analytic (no GPU, no interpreter at this size); torch.profiler on a GPU confirms it.

Per batch on a GPU: launches = eager ops outside the group function + compiled kernels (+ Triton launches).

    python tools/profiler.py ops                       # the 2 x 224 + 6 x 96 recipe, batch 128, ImageNet-sized images
    python tools/profiler.py ops --compiled --json out.json
    python tools/profiler.py ops --compiled --triton   # the CUDA engine: compiled crops + Triton photometric kernels
    python tools/profiler.py ops --triton --cuda       # on a GPU: the real kernel count (torch.profiler) and time

`--cuda` (GPU only) confirms the counts: the kernels torch.profiler records for one engine call, and the time
between CUDA events recorded around the call (it includes any gap while the host launches).
"""
from __future__ import annotations

import argparse
import inspect
import json
import time
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import pipelines.augment.engine as ga
from pipelines.augment import kernels as pk
from pipelines.spec import MultiCropSpec

aten = torch.ops.aten
_NO_KERNEL = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.lift_fresh.default,
              aten.detach.default, aten._local_scalar_dense.default}
_COPIES = {aten._to_copy.default: 0, aten.copy_.default: 1}    # op -> index of the source argument
IMAGE_SIZES = ((375, 500), (500, 375), (333, 500), (400, 400))  # ImageNet-like (h, w), cycled over the batch


class DispatchCounter(TorchDispatchMode):
    """Counts ops dispatched on `device_type`, per region ('outside' or 'group')."""

    def __init__(self, device_type: str):
        super().__init__()
        self.device_type, self.region = device_type, "outside"
        self.ops, self.launches, self.bytes = Counter(), Counter(), Counter()
        self.op_names: Counter = Counter()
        self.h2d: list[dict] = []
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        on_dev = [t for t in outs if t.device.type == self.device_type]
        if func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.syncs += 1
        if func in _COPIES:
            src = args[_COPIES[func]]
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and on_dev:
                self.h2d.append({"bytes": src.numel() * src.element_size(), "pinned": bool(src.is_pinned()),
                                 "shape": list(src.shape), "region": self.region})
        if not on_dev:
            return out
        self.ops[self.region] += 1
        if not func.is_view and func not in _NO_KERNEL:
            self.launches[self.region] += 1
            self.bytes[self.region] += sum(t.numel() * t.element_size() for t in on_dev)
            self.op_names[func.__name__] += 1
        return out


@contextmanager
def _host_tensors(counter: DispatchCounter):
    """`torch.tensor(data, device=dev)` copies host data to the device below the dispatcher: count it here."""
    origs = {name: getattr(torch, name) for name in ("tensor", "as_tensor")}

    def wrap(orig):
        def made(data, *a, **k):
            dev = k.get("device")
            if dev is not None and torch.device(dev).type == counter.device_type and not isinstance(data, torch.Tensor):
                out = orig(data, *a, **{**k, "device": "cpu"})
                counter.h2d.append({"bytes": out.numel() * out.element_size(), "pinned": False,
                                    "shape": list(out.shape), "region": counter.region})
            return orig(data, *a, **k)
        return made

    for name, orig in origs.items():
        setattr(torch, name, wrap(orig))
    try:
        yield
    finally:
        for name, orig in origs.items():
            setattr(torch, name, orig)


@contextmanager
def _group_region(counter: DispatchCounter):
    """Mark ops dispatched inside `augment.engine.group_views` and `stored_crop` (or, for an engine without them,
    `_augment`)."""
    targets = [(ga, n) for n in ("group_views", "stored_crop") if hasattr(ga, n)] or [(ga.MultiCropAugment, "_augment")]
    origs = [getattr(owner, name) for owner, name in targets]

    def wrap(orig):
        def wrapped(*a, **k):
            counter.region = "group"
            try:
                return orig(*a, **k)
            finally:
                counter.region = "outside"
        return wrapped

    for (owner, name), orig in zip(targets, origs):
        setattr(owner, name, wrap(orig))
    try:
        yield
    finally:
        for (owner, name), orig in zip(targets, origs):
            setattr(owner, name, orig)


def _triton_totals(launches: list[dict]) -> dict:
    return {"triton_launches": len(launches), "triton_bytes_written": sum(r["bytes_written"] for r in launches),
            "triton_kernels": dict(Counter(r["kernel"] for r in launches))}


def make_engine(spec: MultiCropSpec, compile: bool | None = None, triton: bool = False) -> ga.MultiCropAugment:
    """The engine as the training pipelines build it (bf16, channels-last); compiled groups (and the Triton path)
    store float16 between kernels, as on CUDA."""
    kw = {"out_dtype": torch.bfloat16, "channels_last": True}
    params = inspect.signature(ga.MultiCropAugment).parameters
    if "compile" in params:
        kw.update(compile=compile, work_dtype=torch.float16 if compile or triton else None)
    if "use_triton" in params:
        kw.update(use_triton=triton)
    elif triton:
        raise SystemExit("--triton: this engine has no Triton path")
    return ga.MultiCropAugment(spec, **kw)


def images(batch: int, device: str, seed: int = 0, shapes=IMAGE_SIZES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = [shapes[i % len(shapes)] for i in range(batch)]
    if device == "meta":
        return [torch.empty(3, h, w, dtype=torch.uint8, device="meta") for h, w in sizes]
    return [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]


def count_eager(engine, imgs, seed: int = 0) -> dict:
    """Dispatch counts of one call (`imgs` on any device; 'meta' measures the real recipe for free), after one
    warm-up call (what an engine caches per device is made then)."""
    engine(imgs, generator=torch.Generator().manual_seed(seed + 1))
    counter = DispatchCounter(imgs[0].device.type)
    with _group_region(counter), _host_tensors(counter), pk.record_launches() as launches, counter:
        engine(imgs, generator=torch.Generator().manual_seed(seed))
    return {"ops": dict(counter.ops), "launches": dict(counter.launches), "bytes_written": dict(counter.bytes),
            "h2d_copies": counter.h2d, "h2d_pageable": sum(not c["pinned"] for c in counter.h2d),
            "syncs": counter.syncs, "top_ops": counter.op_names.most_common(12), **_triton_totals(launches)}


def time_eager(engine, imgs, repeats: int = 3) -> float:
    torch.set_num_threads(1)
    engine(imgs, generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for r in range(repeats):
        t = time.perf_counter()
        engine(imgs, generator=torch.Generator().manual_seed(r + 1))
        best = min(best, time.perf_counter() - t)
    return best


def count_compiled(engine, imgs, seed: int = 0) -> dict:
    """Kernels Inductor generates (and extern kernels it calls) for the compiled group functions of one call, and
    the bytes those kernels write. Caches are off so that every graph is generated (and counted) in this call."""
    import torch._dynamo
    import torch._inductor.config as ic
    from torch._inductor import metrics
    from torch._inductor.graph import GraphLowering
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    totals = Counter()
    orig = GraphLowering.codegen

    def codegen(self):
        result = orig(self)
        for node in self.scheduler.nodes:
            totals["bytes_written"] += node.get_write_buffer_sizes()
            totals["extern_kernels"] += isinstance(node, ExternKernelSchedulerNode)
            totals["fused_nodes"] += not isinstance(node, ExternKernelSchedulerNode)
        totals["graphs"] += 1
        return result

    torch._dynamo.reset()
    metrics.reset()
    GraphLowering.codegen = codegen
    try:
        # Triton kernels (if the engine uses them) are recorded, not run: CPU tensors, no interpreter.
        with ic.patch(fx_graph_cache=False, autotune_local_cache=False), pk.record_launches(execute=False) as rec:
            engine(imgs, generator=torch.Generator().manual_seed(seed))
    finally:
        GraphLowering.codegen = orig
    return {"inductor_kernels": metrics.generated_kernel_count, "ir_nodes_pre_fusion": metrics.ir_nodes_pre_fusion,
            **totals, **_triton_totals(rec)}


def count_cuda(engine, imgs, seed: int = 0, repeats: int = 5) -> dict:
    """On a GPU: the kernels of one steady-state engine call as torch.profiler records them (memcpy/memset apart),
    and the time between CUDA events around a call (best of `repeats`), after two warm-up calls (compilation)."""
    from torch.profiler import ProfilerActivity, profile
    for r in range(2):
        engine(imgs, generator=torch.Generator().manual_seed(seed + 10 + r))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine(imgs, generator=torch.Generator().manual_seed(seed))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [n for n in names if n.startswith(("Memcpy", "Memset"))]
    best = float("inf")
    for r in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        engine(imgs, generator=torch.Generator().manual_seed(seed + r))
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end))
    return {"kernels": len(names) - len(copies), "memcpy_memset": len(copies), "gpu_ms": best,
            "top_kernels": Counter(n for n in names if n not in copies).most_common(12)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="profiler.py ops", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--num-local", type=int, default=6)
    p.add_argument("--images", default=",".join(f"{h}x{w}" for h, w in IMAGE_SIZES),
                   help="image sizes HxW, comma-separated, cycled over the batch")
    p.add_argument("--compiled", action="store_true", help="also compile the group functions on the CPU and count")
    p.add_argument("--triton", action="store_true",
                   help="count the CUDA engine's Triton photometric kernels (analytically, from their launches)")
    p.add_argument("--cuda", action="store_true",
                   help="on a GPU: count the CUDA engine's kernels with torch.profiler and time one call")
    p.add_argument("--cpu-time", type=int, default=0, metavar="N",
                   help="also time the eager engine on real CPU images at batch N (one thread, best of 3)")
    p.add_argument("--json", help="write the counts to this file")
    a = p.parse_args(argv)
    try:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in a.images.split(","))
    except ValueError:
        p.error(f"--images: expected HxW[,HxW...], got '{a.images}'")
    spec = MultiCropSpec.twist(global_size=a.global_size, local_size=a.local_size, num_local=a.num_local)
    res = {"recipe": f"2x{a.global_size} + {a.num_local}x{a.local_size}, batch {a.batch}",
           "eager_meta": count_eager(make_engine(spec, compile=False, triton=a.triton),
                                     images(a.batch, "meta", shapes=shapes))}
    if a.cpu_time:
        res["cpu_seconds"] = time_eager(make_engine(spec, compile=False), images(a.cpu_time, "cpu", shapes=shapes))
    if a.cuda:
        if not torch.cuda.is_available():
            p.error("--cuda: no CUDA device")
        eng = make_engine(spec, compile=True, triton=a.triton)
        res["cuda"] = count_cuda(eng, [im.cuda() for im in images(a.batch, "cpu", shapes=shapes)])
    if a.compiled:
        res["compiled_cpu"] = count_compiled(make_engine(spec, compile=True, triton=a.triton),
                                             images(a.batch, "cpu", shapes=shapes))
    e = res["eager_meta"]
    print(f"{res['recipe']}; images {shapes} cycled")
    for region in ("outside", "group"):
        print(f"eager {region:>7}: {e['ops'].get(region, 0):5d} ops dispatched, {e['launches'].get(region, 0):5d} "
              f"launch kernels, {e['bytes_written'].get(region, 0) / 1e9:7.3f} GB written")
    if e["triton_launches"]:
        print(f"Triton photometric kernels: {e['triton_launches']} launches {e['triton_kernels']}, "
              f"{e['triton_bytes_written'] / 1e9:.3f} GB written (counted from the launches)")
    print(f"host->device copies: {len(e['h2d_copies'])} ({e['h2d_pageable']} from pageable memory); "
          f"host syncs: {e['syncs']}")
    if a.cpu_time:
        print(f"eager on the CPU, batch {a.cpu_time}, one thread: {res['cpu_seconds']:.3f} s per call (best of 3)")
    if "compiled_cpu" in res:
        c = res["compiled_cpu"]
        launches = e["launches"].get("outside", 0) + c["inductor_kernels"] + c["extern_kernels"] + c["triton_launches"]
        bytes_ = e["bytes_written"].get("outside", 0) + c["bytes_written"] + c["triton_bytes_written"]
        print(f"compiled (Inductor, CPU backend): {c['graphs']} graphs, {c['ir_nodes_pre_fusion']} IR nodes before "
              f"fusion, {c['fused_nodes']} after, {c['inductor_kernels']} generated + {c['extern_kernels']} extern "
              f"kernels, {c['bytes_written'] / 1e9:.3f} GB written")
        what = "compiled crops + Triton photometric kernels" if a.triton else "compiled groups"
        print(f"per batch with {what}: {launches} launches, {bytes_ / 1e9:.3f} GB written")
    if "cuda" in res:
        c = res["cuda"]
        print(f"on {torch.cuda.get_device_name()} (torch.profiler): {c['kernels']} kernels + {c['memcpy_memset']} "
              f"memcpy/memset per call; {c['gpu_ms']:.2f} ms between events around a call (best of 5)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return res

