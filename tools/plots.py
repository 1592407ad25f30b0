"""The project's pictures, drawn with matplotlib (Agg, no display needed): training curves from a run's JSONL
log, the profiler's per-stage bars, the gallery of what a trained head's clusters hold, and the augmented views
(tools/show_views.py). Each explains itself without the README: titles say what was drawn and from what.

Each `draw_*` function writes one PNG of a size fixed by its content (so tests can check it) and returns what it
drew: the titles of its panels in order (the gallery: its title first), or the views' layout; `*_figure` functions
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


# -- cluster gallery ------------------------------------------------------------------------------------------
def gallery_rows(logits, labels, num_clusters: int = 8, per_row: int = 10) -> list[dict]:
    """For the `num_clusters` largest clusters of the head's argmax: the `per_row` samples (dataset positions)
    it is most confident about, the cluster size, and the majority true label with its share (labels < 0 mean
    unlabelled)."""
    import torch
    probs = torch.softmax(logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    sizes = torch.bincount(pred, minlength=logits.shape[1])
    rows = []
    for c in torch.argsort(sizes, descending=True)[:num_clusters].tolist():
        if sizes[c] == 0:
            break
        members = torch.nonzero(pred == c).flatten()
        top = members[torch.argsort(conf[members], descending=True)[:per_row]]
        row = {"cluster": c, "size": int(sizes[c]), "samples": top.tolist()}
        known = labels[members] if labels is not None else torch.empty(0, dtype=torch.long)
        known = known[known >= 0]
        if known.numel():
            counts = torch.bincount(known)
            row["majority"], row["share"] = int(counts.argmax()), float(counts.max()) / known.numel()
        rows.append(row)
    return rows


GALLERY_TOP = 0.6     # inches above the first row: the two-line title


def gallery_title(shown: int, clusters: int, outputs: int, images: int) -> str:
    """'8 of 10 clusters (largest first)', how many of the head's outputs are empty, and what a row holds."""
    empty = outputs - clusters
    note = "" if not empty else f"; {empty} of the head's {outputs} outputs predict no image"
    return (f"{shown} of {clusters} clusters (largest first{note}) over {images} images:\n"
            f"per cluster, the images the head is most confident about")


def draw_gallery(rows: list[dict], images: dict, path: str | Path, class_names: list[str] | None = None,
                 thumb: float = 0.9, title: str = "") -> list[str]:
    """One row per cluster: its most confident images (`images[sample]`: a PIL image), titled with the cluster
    id, size and majority true label. Returns the figure's title, then each row's label."""
    plt = _pyplot()
    per_row = max(len(r["samples"]) for r in rows)
    height = len(rows) * thumb + GALLERY_TOP + 0.1
    fig, axes = plt.subplots(len(rows), per_row, figsize=(per_row * thumb + 2.4, height), dpi=DPI, squeeze=False)
    titles = []
    for r, row_axes in zip(rows, axes):
        text = f"cluster {r['cluster']}\n{r['size']} image{'s' if r['size'] != 1 else ''}"
        if "majority" in r:
            name = class_names[r["majority"]] if class_names else str(r["majority"])
            text += f"\nmajority {name}: {100 * r['share']:.0f}%"
        titles.append(text.replace("\n", ", "))
        for j, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(r["samples"]):
                ax.imshow(images[r["samples"][j]])
            else:
                ax.axis("off")
        row_axes[0].set_ylabel(text, rotation=0, ha="right", va="center", fontsize=8)
    title = title or f"{len(rows)} largest clusters: the images the head is most confident about"
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=2.3 / (per_row * thumb + 2.4), right=0.99, top=1 - GALLERY_TOP / height,
                        bottom=0.01, wspace=0.05, hspace=0.08)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return [title, *titles]


def cluster_gallery(logits, labels, files: list[str], path: str | Path, num_clusters: int = 8,
                    per_row: int = 10) -> list[dict]:
    """Draw the gallery of `gallery_rows` with the images read from `files` (one per row of `logits`), titled
    with how many of the non-empty clusters it shows; class names are the images' folder names. Returns the
    rows (cluster, size, samples as file names, majority)."""
    import torch
    from PIL import Image
    rows = gallery_rows(logits, labels, num_clusters, per_row)
    images = {}
    for r in rows:
        for i in r["samples"]:
            with Image.open(files[i]) as im:
                images[i] = im.convert("RGB")
    names: dict[int, str] = {}
    if labels is not None:
        for f, lab in zip(files, labels.tolist()):
            names.setdefault(lab, Path(f).parent.name)
    class_names = [names.get(i, str(i)) for i in range(max(names, default=-1) + 1)]
    clusters = int(torch.unique(logits.argmax(dim=1)).numel())
    draw_gallery(rows, images, path, class_names,
                 title=gallery_title(len(rows), clusters, int(logits.shape[1]), int(logits.shape[0])))
    return [{**r, "samples": [Path(files[i]).name for i in r["samples"]],
             **({"majority_name": class_names[r["majority"]]} if "majority" in r else {})} for r in rows]


# -- augmented views ------------------------------------------------------------------------------------------
VIEW_CELL = 160      # display px of the largest view; every other view is scaled by the same factor
VIEW_PAD = 8         # px between tiles and rows
VIEW_HEADER = 74     # px above the first row: the title (2 lines) and the column labels (2 lines)


def view_columns(view_sizes: list[int], num_global: int) -> list[str]:
    """Column labels: original, global 1, global 2, local 1, ... with each view's size in px."""
    labels = ["original"]
    for i, s in enumerate(view_sizes):
        kind, k = ("global", i + 1) if i < num_global else ("local", i + 1 - num_global)
        labels.append(f"{kind} {k}\n{s} px")
    return labels


def draw_views(originals: list, views: list, mean, std, path: str | Path, title: str, num_global: int,
               cell: int = VIEW_CELL) -> dict:
    """One row per image: the original (fitted to the largest view's height, its size in its label), then each
    view de-normalised and drawn at its TRUE relative size: a view of S px is S * cell / max_size px wide, so a
    96 px local crop is drawn 96/224 as wide as a 224 px global. `originals` are uint8 (3, H, W) tensors,
    `views` (N, 3, S, S) normalised tensors, globals first. Returns the layout: the figure's size in px, the
    column labels and each tile's box (x, y, w, h in px from the top left), row by row."""
    import torch
    import torch.nn.functional as F
    plt = _pyplot()
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    sizes = [int(v.shape[-1]) for v in views]
    scale = cell / max(sizes + [1])
    disp = [max(1, round(sz * scale)) for sz in sizes]      # display width = height of each view column

    def resize(img, h: int, w: int):
        img = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]
        return img.clamp(0, 1).permute(1, 2, 0).numpy()

    orig_w = [max(1, round(o.shape[-1] * cell / o.shape[-2])) for o in originals]
    col_w = [min(max(orig_w), 2 * cell)] + disp
    col_x = [VIEW_PAD]
    for w in col_w[:-1]:
        col_x.append(col_x[-1] + w + VIEW_PAD)
    width = col_x[-1] + col_w[-1] + VIEW_PAD
    height = VIEW_HEADER + len(originals) * (cell + VIEW_PAD)
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    labels = view_columns(sizes, num_global)
    shapes = {tuple(o.shape[-2:]) for o in originals}
    labels[0] = ("original " + (f"{originals[0].shape[-1]}x{originals[0].shape[-2]} px" if len(shapes) == 1
                                else "(sizes vary)") + "\nfitted to the row")
    boxes = []
    for r, orig in enumerate(originals):
        y = VIEW_HEADER + r * (cell + VIEW_PAD)
        ow = min(orig_w[r], col_w[0])
        oh = min(cell, max(1, round(orig.shape[-2] * ow / orig.shape[-1])))
        tiles = [(resize(orig.float() / 255.0, oh, ow), ow, oh)]
        tiles += [(resize(v[r].detach().float().cpu() * s + m, d, d), d, d) for v, d in zip(views, disp)]
        row = []
        for c, (img, w, h) in enumerate(tiles):
            x0 = col_x[c] + (col_w[c] - w) // 2
            y0 = y + (cell - h) // 2                # centred in the row: sizes compare on one line
            ax = fig.add_axes([x0 / width, 1 - (y0 + h) / height, w / width, h / height])
            ax.imshow(img, interpolation="nearest", aspect="auto")
            ax.set_axis_off()
            row.append((x0, y0, w, h))
        boxes.append(row)
    for c, text in enumerate(labels):
        fig.text((col_x[c] + col_w[c] / 2) / width, 1 - (VIEW_HEADER - 4) / height, text, ha="center",
                 va="bottom", fontsize=8, linespacing=1.1)
    fig.text(0.5, 1 - 6 / height, title, ha="center", va="top", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return {"size": (width, height), "labels": labels, "boxes": boxes, "scale": scale}
