"""One-shot device check: on a fresh GPU machine, one command proves or disproves the GPU path's claims.

    python tools/gpu_check.py --out DIR               # on a GPU (make gpu-check): <= 4 minutes on one H200
    python tools/gpu_check.py --cpu-smoke --out DIR   # the same stages on the CPU at tiny sizes (CI)

Stages, in order of value, each in its own process with a hard deadline (and all within --budget-s):
1. environment: versions, a CUDA sanity check, and its own ImageNet-like set (tools/imagenet_like.py: ~2,000 JPEGs of
   ~400x350 from scikit-image's photos, some progressive, some grayscale, one CMYK);
2-4. the recommended `torch` backend (nvJPEG + the tensor engine, bf16, channels-last, compiled) on
   configs/rn50_multicrop.yaml (ResNet-50, 2x224 + 6x96, batch 128): loader-only, model-only, end-to-end
   (tools/profiler.py's `profile_phases`, the real training step) — the project's claims;
5. the CUDA tests (`pytest -m cuda`; test modules whose optional dependency is missing are left out and listed);
6. the official-style baseline (`pil` loader, fp16, NCHW, eager): the same three phases;
7. `dali` when importable; then, if time is left, the model-only step with the official 12 local views.
A stage that fails or passes its deadline is stopped and recorded with its status and last error line; the stages
after it still run while the budget lasts. DIR/gpu_check.json and DIR/gpu_check.md are always written, with
whatever finished; the exit status is non-zero, with one line, when a stage did not finish or a CUDA test failed.
`--cpu-smoke` runs the same stages and processes at tiny sizes: the model compiled with dynamo (backend `eager`:
the same tracing, guards and graph breaks), loader workers, bf16. It installs nothing and needs only torch,
torchvision, PyYAML, rich, timm, scipy, scikit-image and pytest.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from engine.cli import entry_point

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
         "model.head_hidden=32", "model.head_dim=16", "data.workers=2", "train.compile_backend=eager",
         "data.dali.threads=1", "data.dali.prefetch=1"]
SMOKE_BACKEND = {"pil": ["train.precision=fp32"]}   # fp16 autocast needs CUDA; the others keep bf16 on the CPU
PHASES = ("loader", "model", "end_to_end")
# (stage, deadline on a GPU, deadline in the CPU rehearsal) in seconds. GPU: the arithmetic in BENCHMARKS.md
# ("gpu-check's window"); CPU: generous, for a loaded 2-core CI machine.
STAGES = [("environment", 25, 300), ("torch: loader", 40, 300), ("torch: model", 75, 300),
          ("torch: end_to_end", 15, 300), ("cuda tests", 60, 300), ("pil: loader", 10, 300),
          ("pil: model", 10, 300), ("pil: end_to_end", 10, 300), ("dali: loader", 15, 300),
          ("dali: model", 30, 300), ("dali: end_to_end", 10, 300), ("local12: model", 20, 300)]
OPTIONAL_MODULES = {"ffcv": "ffcv", "nvidia.dali": "nvidia"}    # import name -> top-level name in test files


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
    smoke_over = [*SMOKE, *SMOKE_BACKEND.get(name, [])] if smoke else []
    return load_config(str(RECIPE), [*COMMON, *over, f"data.path={data}", *smoke_over, *extra])


def environment(out: Path, smoke: bool) -> dict:
    """Versions, a CUDA sanity check (a bf16 matmul against fp32) and the data set."""
    import torchvision
    from tools.imagenet_like import build_imagenet_like
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
         "cuda": torch.version.cuda, "cpu_cores": os.cpu_count()}
    if available("nvidia.dali"):
        import nvidia.dali
        v["dali"] = nvidia.dali.__version__
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a = torch.randn(512, 512, device=dev)
    err = ((a.bfloat16() @ a.bfloat16()).float() - a @ a).abs().max().item() / (a @ a).abs().max().item()
    if not err < 2 ** -6:
        raise RuntimeError(f"a bf16 matmul on {dev} is off by {err:.2e} relative: the device is not usable")
    size, count = ((64, 56), 48) if smoke else ((400, 350), 2000)
    dataset = build_imagenet_like(out / "data", count=count, size=size, workers=1 if smoke else None)
    return {"versions": v, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
            "dataset": dataset}


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
    return {"views": spec.view_sizes(), "precision": precision.name, **r}


def child(group: str, out: Path, smoke: bool, extra: list[str]) -> int:
    """A stage group in its own process: each finished phase is one JSON line in stages/GROUP.jsonl."""
    from engine.distributed import DistInfo, pick_device
    from tools.profiler import profile_phases
    steps, warmup = (1, 1) if smoke else (10, 3)
    with (out / "stages" / f"{group}.jsonl").open("a") as events:
        def done(phase: str, result: dict) -> None:
            # the finish time on the machine's monotonic clock (shared by processes): the parent judges the deadline
            # by it, not by when its polling happened to notice, which a loaded machine can delay by seconds
            events.write(json.dumps({"phase": phase, "result": result, "t": time.monotonic()}) + "\n")
            events.flush()
        if group == "environment":
            done("environment", environment(out, smoke))
        elif group == "local12":
            done("model", model_only_12_local(out / "data", smoke, steps, warmup))
        else:
            cfg = backend_config(group, out / "data", smoke, extra)
            info = DistInfo(device=pick_device(cfg.train.device))
            for phase, result in profile_phases(cfg, info, steps, warmup, stage_reps=1 if smoke else 3):
                done(phase, result)
    return 0


def last_line(path: Path) -> str:
    """The last non-empty line of a log: a traceback's exception line."""
    lines = [x.strip() for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.exists() else []
    return lines[-1][:300] if lines else "no output"


def run_group(group: str, phases: list[str], deadlines: dict, budget_end: float, out: Path, smoke: bool,
              extra: list[str]) -> list[dict]:
    """Run one stage group's process; each phase gets min(its deadline, the budget left) from the moment the one
    before it finished. Returns one record per phase: ok (with its result), failed, timeout, or skipped."""
    events, log = out / "stages" / f"{group}.jsonl", out / "stages" / f"{group}.log"
    events.unlink(missing_ok=True)
    records, t_phase = [], time.monotonic()
    if budget_end - t_phase <= 0:
        return [{"stage": f"{group}: {p}" if group != "environment" else p, "status": "skipped",
                 "error": "no time left in the budget"} for p in phases]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", group, "--out", str(out),
           *(["--cpu-smoke"] if smoke else []), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(":")}
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    for phase in phases:
        name = phase if group == "environment" else f"{group}: {phase}"
        limit = min(deadlines[name], budget_end - t_phase)
        if limit <= 0:
            records.append({"stage": name, "status": "skipped", "error": "no time left in the budget"})
            continue
        rec = {"stage": name, "deadline_s": limit}
        while True:
            finished = {e["phase"]: e for e in map(json.loads, events.read_text().splitlines())} \
                if events.exists() else {}
            now = time.monotonic()
            if phase in finished:
                took = finished[phase]["t"] - t_phase
                if took <= limit:
                    rec.update(status="ok", seconds=took, result=finished[phase]["result"])
                else:                       # finished, but after its deadline: noticed late
                    proc.kill()
                    proc.wait()
                    rec.update(status="timeout", seconds=took,
                               error=f"ran past its {limit:.3g} s deadline (finished after {took:.1f} s)")
                break
            if proc.poll() is not None:
                rec.update(status="failed", seconds=now - t_phase, error=last_line(log))
                break
            if now - t_phase > limit:
                proc.kill()
                proc.wait()
                rec.update(status="timeout", seconds=now - t_phase,
                           error=f"ran past its {limit:.3g} s deadline and was stopped; last output: {last_line(log)}")
                break
            time.sleep(0.2)
        records.append(rec)
        t_phase = finished[phase]["t"] if rec["status"] == "ok" else time.monotonic()
        if rec["status"] != "ok":           # the group's later phases need this one (same process)
            records += [{"stage": f"{group}: {p}", "status": "not run", "error": f"{phase} did not finish"}
                        for p in phases[phases.index(phase) + 1:]]
            break
    try:
        proc.wait(timeout=max(5.0, budget_end - time.monotonic()))
    except subprocess.TimeoutExpired:     # finished its phases but does not exit
        proc.kill()
        proc.wait()
    return records


@entry_point("gpu_check.py")
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.md, the stage logs, the data")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the same stages, no figures")
    p.add_argument("--backends", default=None, help="comma list of pil,torch,dali (default: all available)")
    p.add_argument("--tests", nargs="*", default=["tests"], help="test paths for `pytest -m cuda`")
    p.add_argument("--budget-s", type=float, default=None, help="the whole check's window (240 s on a GPU)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every backend")
    args = p.parse_intermixed_args(argv)
    smoke, t0 = args.cpu_smoke, time.monotonic()
    out = Path(args.out).resolve()
    if args.child:
        return child(args.child, out, smoke, args.overrides)
    if not smoke and not torch.cuda.is_available():
        print("gpu_check.py: no CUDA device; run with --cpu-smoke on a machine without a GPU", file=sys.stderr)
        return 2
    names = args.backends.split(",") if args.backends else [n for n in BACKENDS
                                                              if n != "dali" or available("nvidia.dali")]
    if set(names) - set(BACKENDS):
        p.error(f"argument --backends: unknown {', '.join(sorted(set(names) - set(BACKENDS)))}; "
                f"choose from {','.join(BACKENDS)}")
    try:
        (out / "stages").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"argument --out: cannot create {out / 'stages'} ({e.strerror}); pass a writable folder")
    budget = args.budget_s or (1800.0 if smoke else 240.0)
    end = t0 + budget
    deadlines = {name: (cpu if smoke else gpu) for name, gpu, cpu in STAGES}
    stages = run_group("environment", ["environment"], deadlines, end, out, smoke, [])
    env = stages[0].get("result") or {}
    tests = None
    plan = [n for n in ("torch", "cuda tests", "pil", "dali") if n in names or n == "cuda tests"]
    for group in plan + ["local12"]:
        if not env and group != "cuda tests":
            stages += [{"stage": f"{group}: {ph}", "status": "not run", "error": "environment did not finish"}
                       for ph in (["model"] if group == "local12" else PHASES)]
            continue
        if group == "cuda tests":
            limit = min(deadlines[group], end - time.monotonic())
            if limit <= 0:
                stages.append({"stage": group, "status": "skipped", "error": "no time left in the budget"})
                continue
            t = time.monotonic()
            proc, left_out = start_cuda_tests(args.tests, out / "cuda_tests.txt")
            tests = finish_cuda_tests(proc, out / "cuda_tests.txt", left_out, limit)
            timed_out = "ran past" in (out / "cuda_tests.txt").read_text()
            stages.append({"stage": group, "deadline_s": limit, "seconds": time.monotonic() - t,
                           "status": "timeout" if timed_out else "failed" if tests["failed"] else "ok",
                           "error": ", ".join(tests["failures"][:3]) or None})
            continue
        stages += run_group(group, ["model"] if group == "local12" else list(PHASES), deadlines, end, out, smoke,
                            args.overrides)
    result = assemble(stages, env, tests, smoke, budget, time.monotonic() - t0)
    from tools.gpu_report import markdown
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    bad = [s for s in stages if s["status"] not in ("ok",)]
    if bad:
        s = bad[0]
        print(f"gpu_check.py: {len(bad)} stage(s) did not finish; first: {s['stage']} {s['status']}"
              f"{': ' + s['error'] if s.get('error') else ''} (report: {out / 'gpu_check.md'})", file=sys.stderr)
        return 1
    return 0


def assemble(stages: list[dict], env: dict, tests: dict | None, smoke: bool, budget: float, wall: float) -> dict:
    """gpu_check.json: the stages (status, seconds, deadline, error) and the figures of those that finished."""
    from tools.gpu_report import targets
    variants: dict = {}
    for s in stages:
        group, _, phase = s["stage"].partition(": ")
        if phase and group in BACKENDS and s["status"] == "ok":
            variants.setdefault(group, {}).update(s["result"])
    twelve = next((s.get("result") for s in stages if s["stage"] == "local12: model" and s["status"] == "ok"), None)
    first = next(iter(variants.values()), {})
    return {"date": datetime.date.today().isoformat(), "mode": "cpu-smoke" if smoke else "gpu",
            "device": env.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"),
            "versions": env.get("versions"), "dataset": env.get("dataset"),
            "recipe": f"{RECIPE.relative_to(ROOT)} augment.num_local=6", "views": first.get("views"),
            "batch_size": first.get("batch_size"), "steps": first.get("steps"), "warmup": first.get("warmup"),
            "budget_s": budget, "wall_s": wall, "cuda_tests": tests,
            "stages": [{k: v for k, v in s.items() if k != "result"} for s in stages],
            "variants": variants, "model_only_12_local": twelve, "targets": targets(variants, smoke)}


if __name__ == "__main__":
    sys.exit(main())
