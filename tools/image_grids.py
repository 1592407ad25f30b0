"""The project's image grids, drawn with matplotlib (Agg): the gallery of what a trained head's clusters hold
(evaluate.py --gallery) and the augmented views at their true relative sizes (tools/show_views.py). Curves and
the profiler's bars: tools/plots.py, whose conventions (fixed PNG sizes, `draw_*` returning what was drawn) these
follow."""
from __future__ import annotations

from pathlib import Path

from tools.plots import DPI, _pyplot

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
