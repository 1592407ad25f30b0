"""gpu_check's report: the targets, and gpu_check.md from the result that gpu_check.json holds."""
from __future__ import annotations

TARGETS = [  # (key, description, test) for the recommended backends on a GPU (issue 12's targets)
    ("loader_samples_per_s", "loader >= 10,000 samples/s", lambda r, b: r["loader_samples_per_s"] >= 10_000),
    ("loader_cpu_cores", "loader <= 2 CPU cores", lambda r, b: r["loader_cpu_cores"] <= 2.0),
    ("pipeline_gpu_mem_device_gib", "pipeline GPU memory <= 3 GiB",
     lambda r, b: (r["pipeline_gpu_mem_device_gib"] or r["pipeline_gpu_mem_torch_gib"] or 0) <= 3.0),
    ("ratio", "end-to-end >= 0.97 x model-only", lambda r, b: r["ratio"] >= 0.97),
    ("model_samples_per_s", "model-only >= 2.1 x official-style",
     lambda r, b: b is not None and "model_samples_per_s" in b and r["model_samples_per_s"] >= 2.1 * b[
         "model_samples_per_s"]),
]

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


def targets(variants: dict, smoke: bool) -> dict:
    """Per recommended backend, each target met (True), missed (False) or not measured (None: a phase that did
    not finish, or the CPU rehearsal)."""
    base = variants.get("pil")
    out = {}
    for name, r in variants.items():
        if name == "pil":
            continue
        res = {}
        for key, desc, test in TARGETS:
            needs = ("end_to_end_samples_per_s",) if key == "ratio" else (key,)
            res[desc] = None if smoke or any(r.get(k) is None for k in needs) else bool(test(r, base))
        out[name] = res
    return out


def _fmt(v, spec: str = ".1f") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(r: dict) -> str:
    v, t = r.get("versions") or {}, r.get("cuda_tests")
    lines = [f"# fasttwist GPU check — {r['device']}", "",
             f"{r['date']} · mode {r['mode']} · wall {r['wall_s']:.0f} s of a {r['budget_s']:.0f} s budget · torch "
             f"{v.get('torch', '?')} · torchvision {v.get('torchvision', '?')} · CUDA {v.get('cuda')} · DALI "
             f"{v.get('dali', 'not installed')} · {v.get('cpu_cores', '?')} CPU cores", ""]
    d = r.get("dataset")
    if d:
        lines += [f"Recipe: `{r['recipe']}`, views {r['views']}, batch {r['batch_size']}; data: {d['files']} JPEGs, "
                  f"mean {d['mean_kb']:.0f} KB ({d['progressive']} progressive, {d['gray']} grayscale, {d['cmyk']} CMYK); "
                  f"timed steps {r['steps']} after {r['warmup']} warm-up.", ""]
    lines += ["Stages, in order of value (each with a hard deadline; a stage past it is stopped):", "",
              "| stage | status | s | deadline s | note |", "|---|---|---:|---:|---|"]
    for s in r["stages"]:
        lines.append(f"| {s['stage']} | {s['status']} | {_fmt(s.get('seconds'), '.0f')} | "
                     f"{_fmt(s.get('deadline_s'), '.0f')} | {s.get('error') or ''} |")
    if t:
        lines += ["", f"CUDA tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped"
                  + (f" — failed: {', '.join(t['failures'])}" if t["failures"] else "")
                  + (f" — left out (optional dependency missing): {', '.join(t['left_out'])}"
                     if t["left_out"] else "")]
    names = list(r["variants"])
    if names:
        lines += ["", "| measure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for label, key, spec in ROWS:
            lines.append(f"| {label} | " + " | ".join(_fmt(r["variants"][n].get(key), spec) for n in names) + " |")
    m = r.get("model_only_12_local")
    if m:
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
