"""One-shot device check: on a fresh GPU machine, one command proves or disproves the GPU path's claims.

    python tools/gpu_check.py --out DIR               # on a GPU (make gpu-check); <= 4 minutes on one H200
    python tools/gpu_check.py --cpu-smoke --out DIR   # the same code paths on the CPU at tiny sizes (CI)

In one process and one run it
1. builds its own ImageNet-like set (tools/imagenet_like.py: ~2,000 JPEGs of ~400x350 from scikit-image's photos,
   some progressive, some grayscale, one CMYK), while
2. the CUDA tests run in a subprocess (`pytest -m cuda`; pass/fail recorded, test modules whose optional
   dependency is not installed are left out and listed);
3. profiles (tools/profiler.py's `profile`, the real training step) the official-style baseline (`pil` loader,
   fp16, NCHW, eager), the `torch` backend (nvJPEG + the tensor engine, bf16, channels-last, compiled) and `dali`
   when importable, on configs/rn50_multicrop.yaml (ResNet-50, 2x224 + 6x96, batch 128): loader-only,
   model-only, end-to-end, their ratio, CPU cores busy, pipeline GPU memory, host syncs; then, if time allows,
   the model-only step with the official 12 local views;
4. writes DIR/gpu_check.json and DIR/gpu_check.md, and exits non-zero with one line when a CUDA test fails or
   a backend cannot be profiled.
It installs nothing and needs only torch, torchvision, PyYAML, rich, timm, scipy, scikit-image and pytest.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "rn50_multicrop.yaml"
COMMON = ["augment.num_local=6", "data.batch_size=128", "train.log_every=1000000"]
BACKENDS = {   # name -> overrides; the first is the baseline the others are compared with
    "pil": ["data.backend=pil", "train.precision=fp16", "train.channels_last=false", "train.compile=false",
            "data.workers={cores}"],
    "torch": ["data.backend=torch", "data.decode_device=cuda", "data.augment_device=cuda", "data.workers=4",
              "train.precision=bf16", "train.channels_last=true", "train.compile=true"],
    "dali": ["data.backend=dali", "data.dali.threads=2", "train.precision=bf16", "train.channels_last=true",
             "train.compile=true"],
}
SMOKE = ["model.arch=resnet18", "data.batch_size=8", "augment.global_size=32", "augment.local_size=16",
         "model.head_hidden=32", "model.head_dim=16", "data.workers=0", "train.precision=fp32",
         "train.compile=false", "data.dali.threads=1", "data.dali.prefetch=1"]
OPTIONAL_MODULES = {"ffcv": "ffcv", "nvidia.dali": "nvidia"}    # import name -> top-level name in test files
TARGETS = [  # (key, description, test) for the recommended backends on a GPU (issue 12's targets)
    ("loader_samples_per_s", "loader >= 10,000 samples/s", lambda r, b: r["loader_samples_per_s"] >= 10_000),
    ("loader_cpu_cores", "loader <= 2 CPU cores", lambda r, b: r["loader_cpu_cores"] <= 2.0),
    ("pipeline_gpu_mem_device_gib", "pipeline GPU memory <= 3 GiB",
     lambda r, b: (r["pipeline_gpu_mem_device_gib"] or r["pipeline_gpu_mem_torch_gib"] or 0) <= 3.0),
    ("ratio", "end-to-end >= 0.97 x model-only", lambda r, b: r["ratio"] >= 0.97),
    ("model_samples_per_s", "model-only >= 2.1 x official-style",
     lambda r, b: b is not None and r["model_samples_per_s"] >= 2.1 * b["model_samples_per_s"]),
]


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def start_cuda_tests(paths: list[str], log: Path) -> tuple[subprocess.Popen, list[str]]:
    """`pytest -m cuda` in a subprocess (it runs while the data set is built). Test files that import an
    optional dependency that is not installed at module level are left out (returned)."""
    missing = [top for mod, top in OPTIONAL_MODULES.items() if not available(mod)]
    left_out = []
    for p in paths:
        for f in sorted(Path(ROOT, p).rglob("test_*.py")) if Path(ROOT, p).is_dir() else [Path(ROOT, p)]:
            if any(re.search(rf"^(import|from) {m}\b", f.read_text(), re.M) for m in missing):
                left_out.append(str(f.relative_to(ROOT)))
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider", *paths,
           *[f"--ignore={f}" for f in left_out]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    return proc, left_out


def finish_cuda_tests(proc: subprocess.Popen, log: Path, left_out: list[str], timeout: float) -> dict:
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        with log.open("a") as f:
            f.write(f"\ngpu_check: the CUDA tests ran past {timeout:.0f} s and were stopped\n")
    text = log.read_text()
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)\b",
                                                text.splitlines()[-1] if text.strip() else "")}
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    failed = counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if rc not in (0, 5) and not failed:       # killed, interrupted or a collection error
        failed, failures = 1, failures or [f"pytest exit status {rc} (see {log.name})"]
    return {"passed": counts.get("passed", 0), "failed": failed, "skipped": counts.get("skipped", 0),
            "failures": failures, "left_out": left_out, "returncode": rc, "log": log.name}


def backend_config(name: str, data: Path, smoke: bool, extra: list[str]):
    from engine.config import load_config
    cores = max(1, min(12, (os.cpu_count() or 2) - 2))
    over = [o.format(cores=cores) for o in BACKENDS[name]]
    over = [*COMMON, *over, f"data.path={data}", *(SMOKE if smoke else []), *extra]
    return load_config(str(RECIPE), over)


def profile_backend(name: str, data: Path, smoke: bool, steps: int, warmup: int, extra: list[str]) -> dict:
    from engine.distributed import DistInfo, pick_device
    from tools.profiler import profile
    cfg = backend_config(name, data, smoke, extra)
    info = DistInfo(device=pick_device(cfg.train.device))
    try:
        return profile(cfg, info, steps, warmup, stage_reps=1 if smoke else 3)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def model_only_12_local(data: Path, smoke: bool, steps: int, warmup: int) -> dict:
    """The step alone with the official 12 local views (bf16, channels-last, eager: no recompilation)."""
    from engine.distributed import DistInfo, pick_device
    from engine.precision import resolve_precision
    from engine.trainer import build_training
    from pipelines.spec import MultiCropSpec
    from tools.profiler import measure_step, synthetic_views
    cfg = backend_config("torch", data, smoke, ["augment.num_local=12", "train.compile=false"])
    info = DistInfo(device=pick_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, info.device)
    _, net, _, step = build_training(cfg, info, 100, precision)
    net.train()
    spec = MultiCropSpec.from_config(cfg.augment)
    views = synthetic_views(spec, cfg.data.batch_size, precision.input_dtype, info.device, True)
    r = measure_step(step, lambda: views, steps, warmup, cfg.data.batch_size, info.device)
    del net, step, views
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"views": spec.view_sizes(), "precision": precision.name, **r}


def targets(variants: dict, smoke: bool) -> dict:
    base = variants.get("pil")
    base = base if base and "error" not in base else None
    out = {}
    for name, r in variants.items():
        if name == "pil" or "error" in r:
            continue
        out[name] = {desc: (None if smoke else bool(test(r, base))) for _, desc, test in TARGETS}
    return out


def versions() -> dict:
    import torchvision
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
         "cuda": torch.version.cuda, "cpu_cores": os.cpu_count()}
    if available("nvidia.dali"):
        import nvidia.dali
        v["dali"] = nvidia.dali.__version__
    return v


def _fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


ROWS = [("loader-only samples/s", "loader_samples_per_s", ".0f"), ("model-only samples/s", "model_samples_per_s", ".0f"),
        ("end-to-end samples/s", "end_to_end_samples_per_s", ".0f"), ("end-to-end / model-only", "ratio", ".3f"),
        ("CPU cores busy, loader", "loader_cpu_cores", ".2f"), ("CPU cores busy, end-to-end", "end_to_end_cpu_cores", ".2f"),
        ("pipeline GPU memory GiB (device, NVML)", "pipeline_gpu_mem_device_gib", ".2f"),
        ("pipeline GPU memory GiB (torch peak)", "pipeline_gpu_mem_torch_gib", ".2f"),
        ("host syncs per loader batch", "loader_syncs_per_batch", ".1f"),
        ("host syncs per model-only step", "model_syncs_per_step", ".1f"),
        ("host syncs per end-to-end step (decode incl.)", "end_to_end_syncs_per_step", ".1f"),
        ("first step s (compile incl.)", "first_step_s", ".1f"), ("forward ms", "forward_ms", ".1f"),
        ("backward ms", "backward_ms", ".1f"), ("optimizer ms", "optimizer_ms", ".1f"),
        ("GPU memory peak GiB (model)", "gpu_mem_peak_gib", ".2f"), ("precision", "precision", ""),
        ("channels-last", "channels_last", ""), ("compiled", "compile", ""), ("loader workers", "workers", "")]


def markdown(r: dict) -> str:
    v, t = r["versions"], r["cuda_tests"]
    lines = [f"# fasttwist GPU check — {r['device']}", "",
             f"{r['date']} · mode {r['mode']} · wall {r['wall_s']:.0f} s · torch {v['torch']} · torchvision "
             f"{v['torchvision']} · CUDA {v['cuda']} · DALI {v.get('dali', 'not installed')} · {v['cpu_cores']} CPU cores",
             "", f"Recipe: `{r['recipe']}`, views {r['views']}, batch {r['batch_size']}; data: {r['dataset']['files']} "
             f"JPEGs, mean {r['dataset']['mean_kb']:.0f} KB ({r['dataset']['progressive']} progressive, "
             f"{r['dataset']['gray']} grayscale, {r['dataset']['cmyk']} CMYK); timed steps {r['steps']} after "
             f"{r['warmup']} warm-up.", "",
             f"CUDA tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
             + (f" — failed: {', '.join(t['failures'])}" if t["failures"] else "")
             + (f" — left out (optional dependency missing): {', '.join(t['left_out'])}" if t["left_out"] else ""), ""]
    names = list(r["variants"])
    lines += ["| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for label, key, spec in ROWS:
        cells = [("error" if "error" in r["variants"][n] else _fmt(r["variants"][n].get(key), spec)) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for n in names:
        if "error" in r["variants"][n]:
            lines += ["", f"`{n}` failed: {r['variants'][n]['error']}"]
    m = r.get("model_only_12_local")
    if m and "error" in m:
        lines += ["", f"Model-only with the official 12 local views failed: {m['error']}"]
    elif m:
        lines += ["", f"Model-only with the official 12 local views ({m['precision']}, channels-last, eager): "
                      f"{m['samples_per_s']:.0f} samples/s."]
    if r["targets"]:
        descs = [d for _, d, _ in TARGETS]
        lines += ["", "Targets (one H200):", "", "| backend | " + " | ".join(descs) + " |",
                  "|---|" + "---|" * len(descs)]
        for n, res in r["targets"].items():
            lines.append(f"| {n} | " + " | ".join({True: "met", False: "**missed**"}.get(res[d], "—")
                                                   for d in descs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, the test log, the data")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the same code paths, no figures")
    p.add_argument("--backends", default=None, help="comma list of pil,torch,dali (default: all available)")
    p.add_argument("--tests", nargs="*", default=["tests"], help="test paths for `pytest -m cuda`")
    p.add_argument("--budget-s", type=float, default=None, help="skip the optional parts past this (240 GPU)")
    p.add_argument("overrides", nargs="*", help="extra config overrides for every backend")
    args = p.parse_intermixed_args(argv)
    smoke, t0 = args.cpu_smoke, time.perf_counter()
    budget = args.budget_s or (90.0 if smoke else 240.0)
    if not smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device; run with --cpu-smoke on a machine without a GPU", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from tools.imagenet_like import build_imagenet_like
    proc, left_out = start_cuda_tests(args.tests, out / "cuda_tests.txt")
    size, count = ((64, 56), 48) if smoke else ((400, 350), 2000)
    data = out / "data"
    dataset = build_imagenet_like(data, count=count, size=size, workers=1 if smoke else None)
    tests = finish_cuda_tests(proc, out / "cuda_tests.txt", left_out, budget * 0.6 - (time.perf_counter() - t0))
    steps, warmup = (1, 1) if smoke else (10, 3)
    names = args.backends.split(",") if args.backends else [n for n in BACKENDS
                                                              if n != "dali" or available("nvidia.dali")]
    variants = {}
    for name in names:
        try:
            variants[name] = profile_backend(name, data, smoke, steps, warmup, args.overrides)
        except Exception as exc:   # recorded and reported; the other backends still run
            variants[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    twelve = None
    if smoke or time.perf_counter() - t0 < budget * 0.75:      # on a GPU only if time allows
        try:
            twelve = model_only_12_local(data, smoke, steps, warmup)
        except Exception as exc:
            twelve = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    first = next((r for r in variants.values() if "error" not in r), {})
    result = {"date": datetime.date.today().isoformat(), "mode": "cpu-smoke" if smoke else "gpu",
              "device": first.get("device") or (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"),
              "versions": versions(), "recipe": f"{RECIPE.relative_to(ROOT)} augment.num_local=6",
              "views": first.get("views"), "batch_size": first.get("batch_size"), "steps": steps, "warmup": warmup,
              "dataset": dataset, "cuda_tests": tests, "variants": variants, "model_only_12_local": twelve,
              "targets": targets(variants, smoke), "wall_s": time.perf_counter() - t0}
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    if tests["failed"]:
        print(f"gpu_check.py: {tests['failed']} CUDA test(s) failed: {', '.join(tests['failures'][:5])} "
              f"(log: {out / 'cuda_tests.txt'})", file=sys.stderr)
        return 1
    broken = [n for n, r in variants.items() if "error" in r]
    if broken:
        print(f"gpu_check.py: could not profile {', '.join(broken)}: {variants[broken[0]]['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
