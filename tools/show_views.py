"""Draw a few training images with all their augmented views, from any backend, into one PNG.

    python tools/show_views.py --data data/demo --out views.png [--config configs/demo.yaml] [--n 4] [key=value ...]

Row i: the original image (left), then every view of it in spec order (globals first), each de-normalised and
scaled to a common height. People judge augmentations by eye first.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cli import entry_point
from engine.config import ConfigError, load_config
from pipelines import build_pipeline
from pipelines.sources import decode_rgb, load_source

ROOT = Path(__file__).resolve().parents[1]


def view_grid(originals: list[torch.Tensor], views: list[torch.Tensor], mean, std, cell: int = 128,
              pad: int = 4) -> torch.Tensor:
    """uint8 (3, H, W) grid: one row per sample, original then its views, each `cell` px high."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)

    def fit(img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        return F.interpolate(img[None].float(), size=(cell, max(1, round(w * cell / h))), mode="bilinear",
                             antialias=True, align_corners=False)[0]

    rows = []
    for i, orig in enumerate(originals):
        tiles = [fit(orig.float() / 255.0)] + [fit(v[i].float().cpu() * s + m) for v in views]
        width = sum(t.shape[-1] for t in tiles) + pad * (len(tiles) - 1)
        row = torch.ones(3, cell, width)
        x = 0
        for t in tiles:
            row[:, :, x:x + t.shape[-1]] = t
            x += t.shape[-1] + pad
        rows.append(row)
    width = max(r.shape[-1] for r in rows)
    grid = torch.ones(3, len(rows) * (cell + pad) - pad, width)
    for i, r in enumerate(rows):
        grid[:, i * (cell + pad):i * (cell + pad) + cell, :r.shape[-1]] = r
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8)


@entry_point("show_views.py")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset root: train/ (and val/) class folders, or one folder of class folders")
    p.add_argument("--out", default="views.png")
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--n", type=int, default=4, help="number of images (rows)")
    p.add_argument("--epoch", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.backend=dali augment.num_local=6")
    args = p.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, [f"data.path={args.data}", f"data.batch_size={args.n}", "data.workers=0",
                                        *args.overrides])
    except ConfigError as exc:
        print(f"show_views.py: {exc}", file=sys.stderr)
        return 2
    pipe = build_pipeline(cfg, cfg.data.train_split)
    pipe.set_epoch(args.epoch)
    batch = next(iter(pipe))
    files, _ = load_source(cfg.data.path, cfg.data.train_split)  # batch indices are dataset indices
    originals = [decode_rgb(Path(files[i]).read_bytes(), files[i]) for i in batch.indices.tolist()]
    grid = view_grid(originals, batch.views, cfg.augment.mean, cfg.augment.std)
    from PIL import Image
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(args.out)
    print(f"wrote {args.out}: {len(originals)} images x {len(batch.views)} views ({cfg.data.backend} backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
