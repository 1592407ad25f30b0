"""The project's plots, drawn with matplotlib (Agg, no display needed): training curves from a run's JSONL log and
the profiler's per-stage bars (the image grids, cluster gallery and augmented views: tools/image_grids.py). Each
explains itself without the README: titles say what was drawn and from what.

Each `draw_*` function writes one PNG of a size fixed by its content (so tests can check it) and returns what it
drew: the titles of its panels in order; `*_figure` functions
return the matplotlib figure itself, for tests that read its text and layout.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

DPI = 100
PANEL_W, PANEL_H = 6.0, 3.2          # inches per curve panel (600 x 320 px)
META_KEYS = ("step", "epoch", "time", "monitor_seconds")   # not drawn
LOSS_KEYS = ("total", "kl", "eh", "he", "ce")  # TWIST terms; `ce` only in the self-labeling phase
RATE_KEYS = ("lr", "samples_per_s", "gpu_mem_gib")
ZERO_UNLESS_SET = ("skipped_files",)   # drawn only when some record is non-zero
RATE_TITLES = {"lr": "learning rate", "samples_per_s": "samples/s", "gpu_mem_gib": "GPU memory peak (GiB)"}
TITLES = {"monitor_knn_top1": "online kNN top-1 (%)", "skipped_files": "unreadable files skipped"}
REFERENCES = {"monitor_knn_top1": ("monitor_pixels_knn_top1", "raw pixels")}  # drawn as a line in the key's panel


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


# -- training curves ------------------------------------------------------------------------------------------
def read_log(path: str | Path) -> list[dict]:
    """The records of a JSONL log. A run still writing may leave a partial last line: it is skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"log '{path}' not found; pass a run folder that holds log.jsonl")
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    if not records:
        raise ValueError(f"log '{path}' holds no step records yet; wait for the first log step")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def curve_panels(records: list[dict]) -> list[tuple[str, list[str]]]:
    """[(title, keys), ...]: losses, (Self-Classifier) per-classifier losses, lr, samples/s, GPU memory when
    logged, then one panel per other numeric key (e.g. a kNN monitor or the self-labeling threshold)."""
    keys: list[str] = []
    for r in records:
        keys += [k for k, v in r.items() if k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool)]
    losses = [k for k in LOSS_KEYS if k in keys]
    per_cls = sorted((k for k in keys if k.startswith("ce") and k[2:].isdigit()), key=lambda k: int(k[2:]))
    panels = [("loss" if not per_cls else "loss (mean over classifiers)", losses)]
    if per_cls:
        panels.append(("loss per classifier", per_cls))
    panels += [(RATE_TITLES[k], [k]) for k in RATE_KEYS if k in keys]
    known = set(META_KEYS) | set(LOSS_KEYS) | set(RATE_KEYS) | set(per_cls) | {r for r, _ in REFERENCES.values()}
    zero = {k for k in ZERO_UNLESS_SET if all(not r.get(k) for r in records)}   # e.g. no bad file met
    panels += [(TITLES.get(k, k), [k]) for k in keys if k not in known | zero]
    return panels


def self_label_start(records: list[dict]) -> int | None:
    """The first logged step of the self-labeling phase (its records carry the cross-entropy `ce`)."""
    return next((r["step"] for r in records if "ce" in r), None)


def draw_curves(records: list[dict], path: str | Path, title: str = "", monitor_every: int | None = None) -> list[str]:
    """curves_figure's figure, saved; returns the panels' titles."""
    fig, titles = curves_figure(records, title, monitor_every)
    _save(fig, path)
    return titles


def curves_figure(records: list[dict], title: str = "", monitor_every: int | None = None):
    """(figure, panel titles): one panel per `curve_panels` entry against the step (integer ticks), legends
    outside the axes on the right so they never cover a curve. A panel whose series hold fewer than 2 points
    draws the points it has and says so in the panel (for the online kNN monitor: how often it ran and every
    how many epochs, `monitor_every` = train.monitor_every_epochs when known)."""
    from matplotlib.ticker import MaxNLocator
    plt = _pyplot()
    panels = curve_panels(records)
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * PANEL_W, rows * PANEL_H), dpi=DPI, squeeze=False)
    sl = self_label_start(records)
    first, last = records[0]["step"], records[-1]["step"]
    for ax, (name, keys) in zip(axes.flat, panels):
        counts = []
        for k in keys:
            x, y = _series(records, k)
            counts.append(len(x))
            ax.plot(x, y, label=k, marker="o" if len(x) < 30 else None, markersize=3 if len(x) > 1 else 6)
            if k in REFERENCES:
                _reference(ax, records, k, x, y)
        if sl is not None:
            ax.axvspan(sl, max(last, sl), color="tab:orange", alpha=0.12, label="self-labeling")
        if max(counts, default=0) < 2:      # the points sit in the lower half, the note above them
            lo, hi = ax.dataLim.y0, ax.dataLim.y1
            if not (math.isfinite(lo) and math.isfinite(hi)):
                lo, hi = 0.0, 1.0
            pad = max(hi - lo, abs(hi) * 0.05, 1e-3)
            top = hi + 1.6 * pad
            ax.set_ylim(lo - 0.3 * pad, min(top, 100.0) if "(%)" in name and hi <= 90 else top)
            ax.text(0.5, 0.93, sparse_note(records, keys, monitor_every), transform=ax.transAxes, ha="center",
                    va="top", fontsize=9, color="0.2",
                    bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.7"))
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_xlim(first, max(last, first + 1))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(ax.get_legend_handles_labels()[0]) > 1:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or f"steps 0-{last}")
    fig.tight_layout()
    return fig, [p[0] for p in panels]


def sparse_note(records: list[dict], keys: list[str], monitor_every: int | None = None) -> str:
    """What a panel with fewer than 2 points per series says beside the points it has (short lines)."""
    steps = sorted({s for k in keys for s in _series(records, k)[0]})
    n = len(steps)
    at = "" if not steps else f" (step {', '.join(str(s) for s in steps[:4])}{', ...' if n > 4 else ''})"
    times = "never" if n == 0 else "once" if n == 1 else f"{n} times"
    if any(k.startswith("monitor_") for k in keys):
        lines = [f"monitor ran {times}{at}"]
        if monitor_every:
            lines.append(f"it runs every {monitor_every} epoch{'s' if monitor_every != 1 else ''} "
                         f"(train.monitor_every_epochs)")
        epochs = records[-1].get("epoch")
        if isinstance(epochs, int):
            lines.append(f"{epochs + 1} epoch{'s' if epochs else ''} logged; a curve needs 2 points")
        return "\n".join(lines)
    return f"logged {times}{at}:\na curve needs 2 points"


def _reference(ax, records: list[dict], key: str, x: list[float], y: list[float]) -> None:
    """The panel's references: a dashed line at the logged reference value (the raw pixels), and the step-0
    point marked as the network at initialisation."""
    ref_key, ref_label = REFERENCES[key]
    _, ref = _series(records, ref_key)
    if ref:
        ax.axhline(ref[-1], color="tab:red", linestyle="--", label=f"{ref_label} {ref[-1]:.1f}")
    if x and x[0] == 0:
        ax.annotate(f"init {y[0]:.1f}", (x[0], y[0]), textcoords="offset points", xytext=(6, 4), fontsize=8)


def _save(fig, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)


# -- profiler -------------------------------------------------------------------------------------------------
STAGES = ("loader", "forward", "backward", "optimizer", "end-to-end")


def stage_ms(result: dict) -> list[float]:
    """Milliseconds per batch of each stage in STAGES, from one profiler result (tools/profiler.py's JSON)."""
    bs = result["batch_size"]

    def per_batch(rate: float) -> float:
        return 1e3 * bs / rate if rate > 0 else float("nan")
    return [per_batch(result["loader_samples_per_s"]), result["forward_ms"], result["backward_ms"],
            result["optimizer_ms"], per_batch(result["end_to_end_samples_per_s"])]


def is_baseline(result: dict) -> bool:
    """The baseline is the run marked so, or the plain PIL loader (the official-style CPU pipeline)."""
    return bool(result.get("baseline", result.get("pipeline") == "pil"))


def profile_label(result: dict) -> str:
    return result.get("name") or result["pipeline"] + (" (baseline)" if is_baseline(result) else "")


def profile_title(runs: list[dict]) -> str:
    """Which backends, which is the baseline, and what was profiled (device, batch, views; each that differs
    between the runs said so)."""
    parts = []
    for key, fmt in (("device", "on {}"), ("batch_size", "batch {}"), ("views", "views {}")):
        values = {json.dumps(r.get(key)) for r in runs}
        parts.append(fmt.format(runs[0].get(key, "")) if len(values) == 1 else f"{key.split('_')[0]}s differ")
    base = [r["pipeline"] for r in runs if is_baseline(r)]
    names = ", ".join(profile_label(r) for r in runs if not is_baseline(r))
    if base and names:
        head = f"{names} beside the baseline {', '.join(base)} (grey, hatched)"
    elif base:
        head = f"the baseline {', '.join(base)} alone"
    else:
        head = f"{names}; no baseline: add the pil loader (--pipeline ...,pil or --compare pil.json)"
    return f"{head}\n{', '.join(parts)}"


def draw_profile(results: list[dict], path: str | Path) -> list[str]:
    """profile_figure's figure, saved; returns the two panels' titles."""
    fig = profile_figure(results)
    _save(fig, path)
    return [a.get_title() for a in fig.axes]


def profile_figure(results: list[dict]):
    """One group of bars per stage, one bar per profiled backend, the baseline (hatched, grey) first in each
    group; a second panel with the samples/s of loader, model-only step and end-to-end. One legend, outside the
    axes on the right; the title says what was profiled and which bar is the baseline."""
    import numpy as np
    plt = _pyplot()
    runs = sorted(results, key=lambda r: not is_baseline(r))  # baseline first, at the left of each group
    labels = [profile_label(r) for r in runs]
    labels = [f"{lab} #{labels[:i].count(lab) + 1}" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(2 * PANEL_W, PANEL_H + 0.6), dpi=DPI)
    width = 0.8 / len(runs)
    x = np.arange(len(STAGES))
    for i, (r, label) in enumerate(zip(runs, labels)):
        style = dict(color="0.6", hatch="//", edgecolor="0.3") if is_baseline(r) else {}
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, stage_ms(r), width, label=label, **style)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        rates = [r["loader_samples_per_s"], r["model_samples_per_s"], r["end_to_end_samples_per_s"]]
        bars = ax2.bar(np.arange(3) + (i - (len(runs) - 1) / 2) * width, rates, width, label=label, **style)
        ax2.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, STAGES)
    ax.set_ylabel("ms per batch")
    ax.set_title("time per stage (lower is better)")
    ax2.set_xticks(np.arange(3), ["loader", "model-only", "end-to-end"])
    ax2.set_ylabel("samples/s")
    ax2.set_title("throughput (higher is better)")
    for a in (ax, ax2):
        a.grid(axis="y", alpha=0.3)
        a.margins(y=0.12)                   # room for the bar labels
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, title="backend",
               title_fontsize=8)
    fig.suptitle(profile_title(runs), fontsize=9)
    fig.tight_layout()
    return fig
